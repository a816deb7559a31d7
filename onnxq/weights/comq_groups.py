"""COMQ with group-wise scales (pure numpy): one scale (and zero point) per g consecutive
input coordinates of each row, the last group partial when g does not divide d_in.

The objective is COMQ's, sum_r (w_r - q_r)^T H (w_r - q_r), with q_rj = s_r,a(j) (c_rj - z_r,a(j))
and a(j) = floor(j / g). What changes against per-row COMQ (onnxq.weights.comq):

Start: per row, the best of the shrunk min-max candidates (each group's own min-max, shrunk by
the same fraction across the row), and round to nearest per group exactly as
onnxq.qparams.round_to_nearest_weight computes it (float32 max|w| / qmax, zero point 0); then
GPTQ's codes at that start where they are better.

Code step: unchanged; each coordinate rounds on its own group's scale and zero point.

Scale step, per group a with the other groups fixed (coordinate descent over the groups): with
u = c_a - z 1 on group a's coordinates and r = w - q + q_a (the row without group a's part),
the error is const - 2 s u^T (H r)_a + s^2 u^T H_aa u, minimized at
s* = u^T (H r)_a / u^T H_aa u; (H r)_a = g_a + H_aa q_a with g = (w - q) H. Asymmetric rows
score every integer z of the grid in closed form, as in `comq.scale_step`. A group keeps its
(s, z) unless a candidate lowers the error, so neither step ever raises it, and the result is
never worse than round to nearest per group on the (damped) objective.
"""

from __future__ import annotations

import numpy as np

from onnxq.config import ComqConfig
from onnxq.numerics import MIN_SCALE, IntRange
from onnxq.weights.comq import (
    ComqResult,
    _code_sweep,
    _coordinate_order,
    _minmax_scales,
    _Problem,
    _round_codes,
    _zero_for,
    best_scale_and_zero,
    damped,
    gptq_start,
    reconstruction_error,
)


def _padded_groups(weight: np.ndarray, group_size: int) -> np.ndarray:
    """(..., d_in) -> (..., groups, g), the last group padded with zeros (which neither the
    symmetric max |w| nor the asymmetric [min(w, 0), max(w, 0)] range notices)."""
    d_in = weight.shape[-1]
    groups = -(-d_in // group_size)
    padded = np.zeros((*weight.shape[:-1], groups * group_size))
    padded[..., :d_in] = weight
    return padded.reshape(*weight.shape[:-1], groups, group_size)


def _per_coordinate(values: np.ndarray, group_index: np.ndarray) -> np.ndarray:
    """(G, R, groups) -> (G, R, d_in): each coordinate's group value; group_index (G, d_in)."""
    index = np.broadcast_to(group_index[:, None, :], (*values.shape[:2], group_index.shape[-1]))
    return np.take_along_axis(values, index, axis=-1)


def _rtn_candidate(weight: np.ndarray, grid: IntRange, group_size: int):
    """Round to nearest per group as onnxq.qparams does it (symmetric, float32 scales)."""
    amax = np.abs(_padded_groups(weight, group_size)).max(axis=-1)
    scale = np.maximum(amax / grid.qmax, MIN_SCALE).astype(np.float32).astype(np.float64)
    zero = np.zeros_like(scale)
    return scale, zero


def best_group_start(weight: np.ndarray, hessian: np.ndarray, grid: IntRange, symmetric: bool,
                     candidates: tuple[float, ...], group_size: int):
    """Per row, the start (scales and zeros (G, R, groups), codes (G, R, d_in)) of lowest
    H-error among the shrunk min-max candidates and round to nearest per group."""
    d_in = weight.shape[-1]
    group_index = np.broadcast_to(np.arange(d_in) // group_size, (weight.shape[0], d_in))
    padded = _padded_groups(weight, group_size)
    base_scale, base_zero = _minmax_scales(padded, grid, symmetric)
    starts = [_rtn_candidate(weight, grid, group_size)]
    for fraction in candidates:
        scale = base_scale * fraction
        starts.append((scale, base_zero if symmetric else _zero_for(padded, scale, grid)))
    best = None
    for scale, zero in starts:
        codes = _round_codes(padded, scale, zero, grid).reshape(*weight.shape[:-1], -1)[..., :d_in]
        quantized = (codes - _per_coordinate(zero, group_index)) * _per_coordinate(scale, group_index)
        error = reconstruction_error(weight, quantized, hessian)
        if best is None:
            best = [error, scale, zero, codes]
            continue
        better = error < best[0]
        best = [np.where(better, error, best[0]),
                *(np.where(better[..., None], new, old)
                  for new, old in zip((scale, zero, codes), best[1:], strict=True))]
    return best[1], best[2], best[3]


def comq_groups(weight: np.ndarray, hessian: np.ndarray, grid: IntRange, symmetric: bool,
                group_size: int, settings: ComqConfig | None = None) -> ComqResult:
    """COMQ with one scale per `group_size` coordinates: weight (rows, d_in) with hessian
    (d_in, d_in), or batched (G, rows, d_in) with (G, d_in, d_in) as in `comq.comq`. The
    result's scale and zero point are (rows, groups) (batched: (G, rows, groups))."""
    settings = settings or ComqConfig()
    batched = np.ndim(weight) == 3
    weight = np.asarray(weight, np.float64).reshape(-1, *np.shape(weight)[-2:])
    hessian = damped(np.asarray(hessian, np.float64).reshape(-1, *np.shape(hessian)[-2:]),
                     settings.damping)
    d_in = weight.shape[-1]
    scale, zero, codes = best_group_start(weight, hessian, grid, symmetric,
                                          settings.scale_candidates, group_size)
    order = _coordinate_order(weight, hessian, settings.greedy_order)
    inverse = np.argsort(order, axis=-1)
    group_p = np.take_along_axis(np.broadcast_to(np.arange(d_in) // group_size, order.shape), order, -1)
    weight_p = np.take_along_axis(weight, order[:, None, :], axis=-1)
    codes = np.take_along_axis(codes, order[:, None, :], axis=-1)
    hessian_p = np.take_along_axis(np.take_along_axis(hessian, order[:, :, None], axis=1),
                                   order[:, None, :], axis=2)
    problem = _Problem(weight_p, hessian_p, np.diagonal(hessian_p, axis1=-2, axis2=-1).copy())
    scale_p, zero_p = _per_coordinate(scale, group_p), _per_coordinate(zero, group_p)
    quantized = (codes - zero_p) * scale_p
    if settings.gptq_start:
        codes, quantized = gptq_start(problem, codes, quantized, (scale_p, zero_p), grid,
                                      settings.block)
    errors = [float(reconstruction_error(weight_p, quantized, hessian_p).sum())]
    for _ in range(settings.sweeps):
        _code_sweep(problem, quantized, codes, scale_p, zero_p, grid, settings.block)
        errors.append(float(reconstruction_error(weight_p, quantized, hessian_p).sum()))
        if settings.update_scales:
            in_order = np.take_along_axis(codes, inverse[:, None, :], axis=-1)
            scale, zero = group_scale_step(weight, hessian, in_order, scale, zero, grid, symmetric,
                                           group_size)
            scale_p, zero_p = _per_coordinate(scale, group_p), _per_coordinate(zero, group_p)
            quantized = (codes - zero_p) * scale_p
            errors.append(float(reconstruction_error(weight_p, quantized, hessian_p).sum()))
    codes = np.take_along_axis(codes, inverse[:, None, :], axis=-1)
    result = ComqResult(scale.astype(np.float32), zero.astype(np.int64), codes.astype(np.int64),
                        tuple(errors), group_size)
    if batched:
        return result
    return ComqResult(result.scale[0], result.zero_point[0], result.codes[0], result.errors,
                      group_size)


def group_scale_step(weight: np.ndarray, hessian: np.ndarray, codes: np.ndarray,
                     scale: np.ndarray, zero: np.ndarray, grid: IntRange, symmetric: bool,
                     group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes fixed: each group's least-squares scale (and zero point when asymmetric) in turn,
    the others fixed (module docstring). weight / codes (G, R, d_in) in index order, hessian
    (G, d_in, d_in), scale / zero (G, R, groups); returns the new scale and zero."""
    group_index = np.broadcast_to(np.arange(weight.shape[-1]) // group_size,
                                  (weight.shape[0], weight.shape[-1]))
    quantized = (codes - _per_coordinate(zero, group_index)) * _per_coordinate(scale, group_index)
    gradient = (weight - quantized) @ hessian
    scale, zero = scale.copy(), zero.copy()
    for group in range(scale.shape[-1]):
        cols = slice(group * group_size, min((group + 1) * group_size, weight.shape[-1]))
        block = hessian[:, cols, cols]
        c, q_old = codes[..., cols], quantized[..., cols]
        s, z = best_scale_and_zero(_group_products(c, gradient[..., cols] + q_old @ block, block,
                                                   symmetric),
                                   scale[..., group], zero[..., group], grid)
        q_new = (c - z[..., None]) * s[..., None]
        gradient -= (q_new - q_old) @ hessian[:, cols, :]
        quantized[..., cols] = q_new
        scale[..., group], zero[..., group] = s, z
    return scale, zero


def _group_products(codes: np.ndarray, h_r: np.ndarray, block: np.ndarray, symmetric: bool) -> tuple:
    """(c^T (H r)_a, c^T H_aa c, 1^T (H r)_a, 1^T H_aa c, 1^T H_aa 1) per row, each (..., 1);
    the last three None when symmetric (see `comq.best_scale_and_zero`)."""
    code_r = np.sum(codes * h_r, axis=-1)[..., None]
    code_code = np.sum((codes @ block) * codes, axis=-1)[..., None]
    if symmetric:
        return code_r, code_code, None, None, None
    ones_h = block.sum(axis=-1)[:, None, :]
    return (code_r, code_code, h_r.sum(axis=-1)[..., None],
            np.sum(ones_h * codes, axis=-1)[..., None], ones_h.sum(axis=-1)[..., None])
