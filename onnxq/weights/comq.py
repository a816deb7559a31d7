"""COMQ: coordinate-wise minimization of a layer's reconstruction error (pure numpy).

For a layer with weight rows w (one per output channel, d_in long) and calibration inputs X,
the error of quantized rows q is ||X w - X q||^2 = (w - q)^T H (w - q) with H = X^T X, so
H (accumulated once, streamed) is all the data the search needs. Each row is
q = s * (c - z): a scale s, a zero point z (0 when symmetric) and integer codes c in
[qmin, qmax].

Code step (coordinate j of every row at once, in each row's own order): with e = w - q and
g = e H, moving q_j by t changes the error by -2 t g_j + t^2 H_jj, minimized at t* = g_j / H_jj.
The best code is the grid point nearest q_j + t* (a 1-D convex parabola, so rounding to the
nearest feasible code is exact), and g is updated by a rank-1 step: g -= dq_j H_j. One step is
O(d_out d_in); a sweep over all coordinates O(d_out d_in^2).

Scale step: with codes fixed, the error is a quadratic in s with minimum
s* = (c~^T H w) / (c~^T H c~), c~ = c - z; asymmetric rows also pick the best integer z (all of
the grid's z are scored in closed form).

Start: per row, the best of a few shrunk min-max scales with round-to-nearest codes, or GPTQ's
codes at that scale (rounding in the visiting order with least-squares compensation of each
rounding error on the coordinates not yet rounded), whichever has the lower error.

H is damped (H + lambda mean(diag H) I, see `ComqConfig.damping`) before all of this. Both
steps never increase the (damped) error. Greedy order: coordinates with larger |w_j| * ||X_j||
(= |w_j| sqrt(H_jj)) first, as in Zhang et al., "COMQ: A Backpropagation-Free Algorithm for
Post-Training Quantization".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from onnxq.config import ComqConfig
from onnxq.numerics import MIN_SCALE, IntRange


@dataclass(frozen=True)
class ComqResult:
    """Per-row scales, zero points and codes, and the total error after each step.

    Shapes follow the input: (rows,) / (rows, d_in), or with a leading group axis when the
    search ran on a batch of independent layers (e.g. the channels of a depthwise Conv)."""

    scale: np.ndarray
    zero_point: np.ndarray
    codes: np.ndarray
    errors: tuple[float, ...]
    group_size: int = 0  # > 0: scale and zero point per group of coordinates (comq_groups)

    def dequantized(self) -> np.ndarray:
        if self.group_size:
            index = np.arange(self.codes.shape[-1]) // self.group_size
            return (self.codes.astype(np.float64) - self.zero_point[..., index]) * self.scale[..., index]
        return (self.codes.astype(np.float64) - self.zero_point[..., None]) * self.scale[..., None]


def reconstruction_error(weight: np.ndarray, quantized: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Per-row (w - q)^T H (w - q); leading group axes broadcast."""
    error = weight - quantized
    return np.sum((error @ hessian) * error, axis=-1)


def _round_codes(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                 grid: IntRange) -> np.ndarray:
    return np.clip(np.round(values / scale[..., None]) + zero_point[..., None], grid.qmin, grid.qmax)


def _minmax_scales(weight: np.ndarray, grid: IntRange, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    if symmetric:
        scale = np.abs(weight).max(axis=-1) / grid.qmax
        return np.maximum(scale, MIN_SCALE), np.zeros(weight.shape[:-1])
    lo = np.minimum(weight.min(axis=-1), 0.0)
    hi = np.maximum(weight.max(axis=-1), 0.0)
    scale = np.maximum((hi - lo) / (grid.qmax - grid.qmin), MIN_SCALE)
    return scale, np.clip(grid.qmin - np.round(lo / scale), grid.qmin, grid.qmax)


def best_rounded_start(weight: np.ndarray, hessian: np.ndarray, grid: IntRange, symmetric: bool,
                       candidates: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the candidate scale whose round-to-nearest codes have the lowest H-error."""
    base_scale, base_zero = _minmax_scales(weight, grid, symmetric)
    best = None
    for fraction in candidates:
        scale = base_scale * fraction
        zero = base_zero if symmetric else _zero_for(weight, scale, grid)
        codes = _round_codes(weight, scale, zero, grid)
        error = reconstruction_error(weight, (codes - zero[..., None]) * scale[..., None], hessian)
        if best is None:
            best = [error, scale, zero, codes]
            continue
        better = error < best[0]
        best[0] = np.where(better, error, best[0])
        best[1] = np.where(better, scale, best[1])
        best[2] = np.where(better, zero, best[2])
        best[3] = np.where(better[..., None], codes, best[3])
    return best[1], best[2], best[3]


def _zero_for(weight: np.ndarray, scale: np.ndarray, grid: IntRange) -> np.ndarray:
    """Zero point that centres the asymmetric grid on the row's shrunk range."""
    lo = np.minimum(weight.min(axis=-1), 0.0)
    hi = np.maximum(weight.max(axis=-1), 0.0)
    middle = (lo + hi) / 2
    return np.clip(np.round((grid.qmin + grid.qmax) / 2 - middle / scale), grid.qmin, grid.qmax)


def comq(weight: np.ndarray, hessian: np.ndarray, grid: IntRange, symmetric: bool,
         settings: ComqConfig | None = None) -> ComqResult:
    """Quantize weight rows to minimize sum_r (w_r - q_r)^T H (w_r - q_r).

    weight (rows, d_in) with hessian (d_in, d_in); or a batch of independent problems,
    weight (groups, rows, d_in) with hessian (groups, d_in, d_in), searched together.
    """
    settings = settings or ComqConfig()
    batched = np.ndim(weight) == 3
    weight = np.asarray(weight, np.float64).reshape(-1, *np.shape(weight)[-2:])
    hessian = np.asarray(hessian, np.float64).reshape(-1, *np.shape(hessian)[-2:])
    d_in = weight.shape[-1]
    hessian = damped(hessian, settings.damping)
    scale, zero, codes = best_rounded_start(weight, hessian, grid, symmetric,
                                            settings.scale_candidates)
    order = _coordinate_order(weight, hessian, settings.greedy_order)
    weight_p = np.take_along_axis(weight, order[:, None, :], axis=-1)
    codes = np.take_along_axis(codes, order[:, None, :], axis=-1)
    hessian_p = np.take_along_axis(np.take_along_axis(hessian, order[:, :, None], axis=1),
                                   order[:, None, :], axis=2)
    diagonal = np.diagonal(hessian_p, axis1=-2, axis2=-1).copy()
    quantized = (codes - zero[..., None]) * scale[..., None]
    if settings.gptq_start:
        codes, quantized = gptq_start(_Problem(weight_p, hessian_p, diagonal), codes, quantized,
                                      (_per_coordinate(scale, d_in), _per_coordinate(zero, d_in)),
                                      grid, settings.block)
    errors = [float(reconstruction_error(weight_p, quantized, hessian_p).sum())]
    for _ in range(settings.sweeps):
        _code_sweep(_Problem(weight_p, hessian_p, diagonal), quantized, codes,
                    _per_coordinate(scale, d_in), _per_coordinate(zero, d_in), grid, settings.block)
        errors.append(float(reconstruction_error(weight_p, quantized, hessian_p).sum()))
        if settings.update_scales:
            scale, zero = scale_step(weight_p, hessian_p, codes, scale, zero, grid, symmetric)
            quantized = (codes - zero[..., None]) * scale[..., None]
            errors.append(float(reconstruction_error(weight_p, quantized, hessian_p).sum()))
    codes = np.take_along_axis(codes, np.argsort(order, axis=-1)[:, None, :], axis=-1)
    result = ComqResult(scale.astype(np.float32), zero.astype(np.int64), codes.astype(np.int64),
                        tuple(errors))
    if batched:
        return result
    return ComqResult(result.scale[0], result.zero_point[0], result.codes[0], result.errors)


def damped(hessian: np.ndarray, damping: float) -> np.ndarray:
    """H + damping * mean(diag H) I per group (`ComqConfig.damping`)."""
    d_in = hessian.shape[-1]
    trace = np.trace(hessian, axis1=-2, axis2=-1) / d_in
    return hessian + np.eye(d_in) * (damping * np.maximum(trace, 1e-12))[:, None, None]


def gptq_start(problem: _Problem, codes: np.ndarray, quantized: np.ndarray, grid_params: tuple,
               grid: IntRange, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, GPTQ's codes at the start's scales and zero points (per coordinate, in
    `grid_params`) where they have the lower error, else the given codes."""
    scale, zero = grid_params
    feedback = gptq_codes(problem.weight, problem.hessian, scale, zero, grid, block)
    feedback_q = (feedback - zero) * scale
    better = (reconstruction_error(problem.weight, feedback_q, problem.hessian)
              < reconstruction_error(problem.weight, quantized, problem.hessian))[..., None]
    return np.where(better, feedback, codes), np.where(better, feedback_q, quantized)


def _per_coordinate(values: np.ndarray, d_in: int) -> np.ndarray:
    """A row's value repeated for each of its d_in coordinates (a read-only view)."""
    return np.broadcast_to(values[..., None], (*values.shape, d_in))


def _coordinate_order(weight: np.ndarray, hessian: np.ndarray, greedy: bool) -> np.ndarray:
    """Visiting order of the input coordinates per group, shared by the group's rows: by
    decreasing sum_r |w_rj| * ||X_j|| when greedy (the paper orders each row alone; one shared
    order lets a sweep run as blocked matrix products), else index order."""
    groups, _, d_in = weight.shape
    if not greedy:
        return np.broadcast_to(np.arange(d_in), (groups, d_in)).copy()
    diagonal = np.diagonal(hessian, axis1=-2, axis2=-1)
    importance = np.abs(weight).sum(axis=1) * np.sqrt(np.maximum(diagonal, 0.0))
    return np.argsort(-importance, axis=-1, kind="stable")


class _Problem(NamedTuple):
    """The rows to quantize and their (damped, permuted) H with its diagonal."""

    weight: np.ndarray
    hessian: np.ndarray
    diagonal: np.ndarray


def _code_sweep(problem: _Problem, quantized: np.ndarray, codes: np.ndarray, scale: np.ndarray,
                zero: np.ndarray, grid: IntRange, block: int) -> None:
    """One pass over all coordinates, in place, for every group at once (scale and zero per
    coordinate, (groups, rows, d_in): a row's own, or its coordinate group's). Within a block of
    coordinates the gradient is updated column by column; the rest of it once per block, by one
    matrix product (the result is the same as updating everything at every step)."""
    weight, hessian, diagonal = problem
    gradient = (weight - quantized) @ hessian
    d_in = weight.shape[-1]
    for start in range(0, d_in, block):
        stop = min(start + block, d_in)
        deltas = np.zeros((*weight.shape[:2], stop - start))
        for j in range(start, stop):
            target = quantized[..., j] + gradient[..., j] / diagonal[:, j, None]
            s, z = scale[..., j], zero[..., j]
            new_codes = np.clip(np.round(target / s) + z, grid.qmin, grid.qmax)
            delta = (new_codes - z) * s - quantized[..., j]
            codes[..., j] = new_codes
            quantized[..., j] += delta
            gradient[..., start:stop] -= delta[..., None] * hessian[:, None, j, start:stop]
            deltas[..., j - start] = delta
        if stop < d_in:
            gradient[..., stop:] -= deltas @ hessian[:, start:stop, stop:]


def gptq_codes(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray, zero: np.ndarray,
               grid: IntRange, block: int = 128) -> np.ndarray:
    """GPTQ's codes (Frantar et al., 2022) at fixed scales and zero points, coordinates in
    index order: weight (groups, rows, d_in), hessian (groups, d_in, d_in), scale and zero
    per row (groups, rows) or per coordinate (groups, rows, d_in).

    Coordinate j is rounded to the nearest code of its current (compensated) value; with U the
    upper Cholesky factor of H^-1 (H^-1 = U^T U), moving the coordinates after it by
    -(w_j - q_j) / U_jj * U_j,(j+1:) is the least-squares compensation of that rounding error
    over the coordinates not yet rounded (OBQ's update, which GPTQ computes this way). Blocked
    as in GPTQ: later columns get a block's updates at once (same result for any block).
    """
    upper = _inverse_cholesky(hessian)
    work = weight.copy()
    codes = np.empty_like(weight)
    d_in = weight.shape[-1]
    if np.ndim(scale) < weight.ndim:
        scale, zero = _per_coordinate(scale, d_in), _per_coordinate(zero, d_in)
    for start in range(0, d_in, block):
        stop = min(start + block, d_in)
        scaled = np.zeros((*weight.shape[:2], stop - start))
        for j in range(start, stop):
            s, z = scale[..., j], zero[..., j]
            codes[..., j] = np.clip(np.round(work[..., j] / s) + z, grid.qmin, grid.qmax)
            error = (work[..., j] - (codes[..., j] - z) * s) / upper[:, j, j, None]
            work[..., j + 1:stop] -= error[..., None] * upper[:, None, j, j + 1:stop]
            scaled[..., j - start] = error
        if stop < d_in:
            work[..., stop:] -= scaled @ upper[:, start:stop, stop:]
    return codes


def _inverse_cholesky(hessian: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 per group (H^-1 = U^T U). Where H (already damped by
    the settings) is too close to singular, lambda mean(diag H) I is added, lambda from 1e-8
    up tenfold until the factorization succeeds."""
    d_in = hessian.shape[-1]
    mean_diagonal = np.maximum(np.trace(hessian, axis1=-2, axis2=-1) / d_in, 1e-12)[:, None, None]
    for damping in (0.0, *(10.0**k for k in range(-8, 1))):
        try:
            inverse = np.linalg.inv(hessian + np.eye(d_in) * damping * mean_diagonal)
            inverse = (inverse + np.swapaxes(inverse, -1, -2)) / 2
            return np.swapaxes(np.linalg.cholesky(inverse), -1, -2)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("H is not positive definite even with damping")


def scale_step(weight: np.ndarray, hessian: np.ndarray, codes: np.ndarray, scale: np.ndarray,
               zero: np.ndarray, grid: IntRange, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Codes fixed: the least-squares scale per row, s* = (c~^T H w) / (c~^T H c~), c~ = c - z
    (shapes as in `gptq_codes`; returns the new scale and zero point per row).

    Asymmetric rows also choose their zero point: with c~ = c - z 1, numerator and denominator
    are polynomials in z, so every integer z of the grid is scored in O(1) from c^T H w,
    c^T H c, 1^T H w, 1^T H c and 1^T H 1. The error is w^T H w - 2 s num + s^2 den; a row
    keeps its (s, z) unless a candidate lowers it, so the step never raises the error."""
    codes_h = codes @ hessian
    code_w = np.sum(codes_h * weight, axis=-1)[..., None]
    code_code = np.sum(codes_h * codes, axis=-1)[..., None]
    if symmetric:
        return best_scale_and_zero((code_w, code_code, None, None, None), scale, zero, grid)
    ones_h = hessian.sum(axis=-1)[:, None, :]  # H 1, (groups, 1, d_in)
    one_w = np.sum(ones_h * weight, axis=-1)[..., None]
    one_code = np.sum(ones_h * codes, axis=-1)[..., None]
    one_one = ones_h.sum(axis=-1)[..., None]
    return best_scale_and_zero((code_w, code_code, one_w, one_code, one_one), scale, zero, grid)


def best_scale_and_zero(products: tuple, scale: np.ndarray, zero: np.ndarray,
                        grid: IntRange) -> tuple[np.ndarray, np.ndarray]:
    """The (s, z) per row maximizing the error drop 2 s num(z) - s^2 den(z), from the products
    (c^T H w, c^T H c, 1^T H w, 1^T H c, 1^T H 1), each (..., 1); the last three None when
    symmetric (z stays). A row keeps its (s, z) unless a candidate is strictly better."""
    code_w, code_code, one_w, one_code, one_one = products
    if one_w is None:
        zeros = zero[..., None]
        one_w = one_code = one_one = np.zeros_like(code_w)
    else:
        grid_zeros = np.arange(grid.qmin, grid.qmax + 1, dtype=np.float64)
        zeros = np.concatenate([zero[..., None], np.broadcast_to(grid_zeros, (*zero.shape, grid_zeros.size))],
                               axis=-1)
    numerator = code_w - zeros * one_w
    denominator = code_code - 2 * zeros * one_code + zeros**2 * one_one
    usable = (denominator > 0) & (numerator > 0)
    scales = np.maximum(np.where(usable, numerator / np.where(usable, denominator, 1.0), 0.0), MIN_SCALE)
    gains = np.where(usable, 2 * scales * numerator - scales**2 * denominator, -np.inf)
    current = 2 * scale * numerator[..., 0] - scale**2 * denominator[..., 0]  # zeros[..., 0] = zero
    pick = np.argmax(gains, axis=-1)[..., None]
    improve = np.take_along_axis(gains, pick, axis=-1)[..., 0] > current
    return (np.where(improve, np.take_along_axis(scales, pick, axis=-1)[..., 0], scale),
            np.where(improve, np.take_along_axis(zeros, pick, axis=-1)[..., 0], zero))
