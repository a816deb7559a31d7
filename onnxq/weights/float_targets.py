"""Float targets: the weight a layer should approach when it sees the quantized model's inputs.

COMQ minimizes ||X w - X q||^2, the layer's error on its float inputs X. In the quantized
model the layer sees X_q instead (the earlier layers' rounding and the activations'
quantization included), and what the model's output needs is the layer's output on X_q to
come close to the float model's output: ||X_q q - X w||^2 (asymmetric calibration, as in
GPTAQ, Li et al. 2025, "Efficient Finetuning-Free Quantization for Asymmetric Calibration").
Expanded, that is (q - t)^T H (q - t) + const with H = X_q^T X_q, C = X_q^T X and the target
t = H^-1 C w: the same search as COMQ's, on H, toward t rather than w.

The target is ridge-regularized toward w,

    t = argmin ||X_q t - X w||^2 + lambda m ||t - w||^2 = (H + lambda m I)^-1 (C w + lambda m w)

(m = mean(diag H)), so that directions the calibration inputs barely see keep the float
weight, and t = w for any lambda when the inputs agree (X_q = X). The layer's bias then
absorbs the mean of what is left: b' = b - (W_q E[x_q] - W E[x]) (onnxq.stages.bias).
"""

from __future__ import annotations

import numpy as np

from onnxq.numerics import MIN_SCALE


def float_target_rows(rows: np.ndarray, hessian: np.ndarray, cross: np.ndarray, ridge: float) -> np.ndarray:
    """Targets t of the weight rows (groups, rows, d_in) given H = X_q^T X_q and C = X_q^T X
    (groups, d_in, d_in) and the ridge lambda (> 0, relative to mean(diag H))."""
    if ridge <= 0:
        raise ValueError(f"the ridge must be positive, got {ridge}")
    diagonal_mean = np.mean(np.diagonal(hessian, axis1=-2, axis2=-1), axis=-1)[..., None, None]
    damping = ridge * np.maximum(diagonal_mean, MIN_SCALE)
    rows = np.asarray(rows, np.float64)
    right = rows @ np.swapaxes(cross, -1, -2) + damping * rows  # (C w + lambda m w)^T, row by row
    damped = hessian + damping * np.eye(hessian.shape[-1])
    return np.swapaxes(np.linalg.solve(damped, np.swapaxes(right, -1, -2)), -1, -2)
