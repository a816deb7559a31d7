"""Scoring: the one owner of ONNX Runtime sessions, the damage measures and fidelity reports,
and the executor that maps scoring work over items.

    sessions   every ORT session opened (settings, external data past 2 GB, one-line errors)
    damage     mse, kl, infonce, cosine, top-1 agreement: each defined once
    fidelity   quantized-vs-float report and the verification before a model is written
    scorer     Scorer: cached float outputs (Reference), fidelity, LiftedModel probes
    executor   where scoring work runs: in process, local worker processes, or Ray
"""
