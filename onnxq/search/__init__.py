"""Scale search scored through ONNX Runtime: Evol-Q's evolutionary search of activation scales,
block by block (numeric core in `evolution`, graph side in `blocks` and `graph`; the stage is
onnxq.stages.evolq)."""
