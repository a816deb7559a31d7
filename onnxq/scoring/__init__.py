"""Scoring: the one owner of ONNX Runtime sessions (`sessions`), cached float references and
lifted-input candidate models (`scorer`), the damage measures (`damage`), fidelity reports
(`fidelity`), and where scoring work runs (`executor`: in process, local worker processes or
Ray)."""
