"""Calibration: run the float model through ONNX Runtime once, stream what every stage needs to
observe (activation statistics, channel means, Gram matrices), and turn statistics into ranges."""
