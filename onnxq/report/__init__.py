"""What users read about a model: `compare` (fidelity and per-layer damage), `bench` (ORT latency
and the kernels it really runs) and the quantization card."""
