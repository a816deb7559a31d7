"""Bias correction: remove the mean output shift that weight rounding causes.

Rounding W to W_q shifts a layer's output by (W_q - W) x. Its expectation over the
calibration data is (W_q - W) E[x], a constant per output channel that the bias can absorb
(Nagel et al., "Data-Free Quantization", empirical variant):

    b' = b - (W_q - W) E[x]

For a Conv, E[x] is the per-channel mean of the input over batch and space, and the shift of
output channel o sums the weight error over the kernel window and the input channels of o's
group (border padding is ignored). For a Gemm, it is the error matrix times the input's
per-feature mean. Depthwise and small convolutions, whose few weights per channel round
coarsely, gain the most.
"""

from __future__ import annotations

import numpy as np


class RunningChannelMean:
    """Streamed mean of a tensor per channel along `axis` (constant memory, any shape)."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.total: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        channels = np.moveaxis(np.asarray(x, np.float64), self.axis, -1)
        flat = channels.reshape(-1, channels.shape[-1])
        self.total = flat.sum(axis=0) if self.total is None else self.total + flat.sum(axis=0)
        self.count += flat.shape[0]

    @property
    def mean(self) -> np.ndarray:
        if self.total is None or self.count == 0:
            raise ValueError("no data seen")
        return self.total / self.count


def conv_output_shift(weight_error: np.ndarray, input_mean: np.ndarray, group: int) -> np.ndarray:
    """Per-output-channel mean shift of a Conv: sum over (c in o's group, window) of
    error[o, c, ...] * E[x_c]. weight_error is (O, C/group, k...)."""
    out_channels, group_channels = weight_error.shape[:2]
    window_sum = weight_error.reshape(out_channels, group_channels, -1).sum(axis=2)
    group_means = input_mean.reshape(group, group_channels)
    per_group = out_channels // group
    owner = np.arange(out_channels) // per_group
    return np.einsum("oc,oc->o", window_sum, group_means[owner])


def gemm_output_shift(weight_error: np.ndarray, input_mean: np.ndarray, trans_b: bool) -> np.ndarray:
    """Per-output mean shift of a Gemm: B is (N, K) with transB, else (K, N)."""
    matrix = weight_error if trans_b else weight_error.T
    return matrix @ input_mean


def corrected_bias(bias: np.ndarray, shift: np.ndarray) -> np.ndarray:
    return (bias.astype(np.float64) - shift).astype(bias.dtype)
