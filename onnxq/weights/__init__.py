"""Weight searchers: round to nearest and COMQ, each registered against its typed config
(see `onnxq.weights.registry`)."""
