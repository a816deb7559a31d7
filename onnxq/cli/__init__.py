"""The `onnxq` command line: `quantize`, `bench` and `compare` (see onnxq.cli.main)."""

from onnxq.cli.main import main

__all__ = ["main"]
