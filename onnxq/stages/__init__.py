"""The stages of one quantization run, in data-flow order (see onnxq.state)."""
