"""`python -m onnxq` is the `onnxq` command."""

from onnxq.cli import main

main()
