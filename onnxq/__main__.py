"""`python -m onnxq` is the `onnxq` command."""

from onnxq.cli.main import main

main()
