"""Scoring: the one owner of ONNX Runtime sessions, the damage measures and fidelity reports,
and the executor that maps scoring work over items."""
