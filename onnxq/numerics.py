"""The numeric core of linear quantization, pure numpy.

A real value x maps to an integer code q and back as

    q = clip(round(x / s) + z, qmin, qmax)        x_hat = (q - z) * s

with scale s > 0 and zero point z in [qmin, qmax]. Rounding is half-to-even, as in ONNX
QuantizeLinear. Asymmetric ranges [lo, hi] (lo <= 0 <= hi) give s = (hi - lo) / (qmax - qmin)
and z = qmin - round(lo / s), so that 0 is exactly representable. Symmetric ranges use z = 0
(signed) and s = max|x| / qmax over the restricted range [-qmax, qmax] for weights.

Per-channel scales are arrays broadcast along `axis`; every function is explicit about bits,
signedness, axis and symmetry.

Group-wise scales: a weight is viewed as a matrix (`grouped_shape`: 2-D weights as they are, a
Conv weight (O, I, kh, kw) as (O, I * kh * kw)) and its reduction axis `block_axis` is cut into
groups of g consecutive elements, the last one partial when g does not divide the length L.
Scales and zero points have the view's shape with L replaced by ceil(L / g), which is ONNX
DequantizeLinear's blocked layout (opset 21, `block_size` = g); element j of a row uses group
floor(j / g).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The smallest scale we emit: keeps 1/s finite for all-zero tensors.
MIN_SCALE = float(np.finfo(np.float32).tiny) * 2**23


@dataclass(frozen=True)
class IntRange:
    """The integer grid of a quantized type.

    `reduce_8bit`: an 8-bit grid keeps to 7-bit codes (same container), so that integer
    kernels that add u8 x s8 products in int16 cannot saturate (onnxq.cpu); other bit-widths
    are unaffected, and the flag travels with the grid when its bits change (`with_bits`).
    """

    bits: int
    signed: bool
    reduce_8bit: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 32:
            raise ValueError(f"bits must be in [2, 32], got {self.bits}")

    @property
    def code_bits(self) -> int:
        return 7 if self.reduce_8bit and self.bits == 8 else self.bits

    @property
    def qmin(self) -> int:
        return -(2 ** (self.code_bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.code_bits - 1) - 1 if self.signed else 2**self.code_bits - 1

    def with_bits(self, bits: int) -> IntRange:
        return IntRange(bits, self.signed, self.reduce_8bit)

    @property
    def dtype(self) -> np.dtype:
        if self.bits <= 8:
            return np.dtype(np.int8 if self.signed else np.uint8)
        if self.bits <= 16:
            return np.dtype(np.int16 if self.signed else np.uint16)
        return np.dtype(np.int32 if self.signed else np.uint32)


UINT8 = IntRange(8, signed=False)
INT8 = IntRange(8, signed=True)
INT32 = IntRange(32, signed=True)


def asymmetric_params(lo: float, hi: float, grid: IntRange) -> tuple[np.float32, int]:
    """Scale and zero point mapping [lo, hi] (widened to include 0) onto the grid."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / (grid.qmax - grid.qmin), MIN_SCALE)
    zero_point = int(np.clip(grid.qmin - np.round(lo / scale), grid.qmin, grid.qmax))
    return np.float32(scale), zero_point


def symmetric_params(lo: float, hi: float, grid: IntRange) -> tuple[np.float32, int]:
    """Scale and zero point of a symmetric activation range [-a, a], a = max(|lo|, |hi|).

    Signed grids use z = 0 and spread 2a over the full grid (ORT's convention); unsigned grids
    put the zero point in the middle.
    """
    amax = max(abs(float(lo)), abs(float(hi)))
    scale = max(2.0 * amax / (grid.qmax - grid.qmin), MIN_SCALE)
    zero_point = 0 if grid.signed else (grid.qmax + grid.qmin + 1) // 2
    return np.float32(scale), zero_point


def symmetric_weight_scales(weight: np.ndarray, grid: IntRange, axis: int | None) -> np.ndarray:
    """Per-channel (axis) or per-tensor (axis None) scales s = max|w| / qmax, as float32.

    Uses the restricted range [-qmax, qmax], so that -w quantizes like w.
    """
    absolute = np.abs(weight.astype(np.float64))
    if axis is None:
        amax = np.asarray(absolute.max() if absolute.size else 0.0)
    else:
        reduce_axes = tuple(i for i in range(weight.ndim) if i != axis % weight.ndim)
        amax = absolute.max(axis=reduce_axes) if reduce_axes else absolute
    return np.maximum(amax / grid.qmax, MIN_SCALE).astype(np.float32)


def grouped_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The matrix view of a weight that groups run along: 2-D as is, else (shape[0], rest)."""
    shape = tuple(int(d) for d in shape)
    return shape if len(shape) == 2 else (shape[0], math.prod(shape[1:]))


def group_count(length: int, group_size: int) -> int:
    return -(-length // group_size)


def expand_groups(values: np.ndarray, block_axis: int, group_size: int, length: int) -> np.ndarray:
    """Per-group values (view shape, ceil(L / g) along block_axis) repeated per element (L)."""
    return np.take(np.repeat(np.asarray(values), group_size, axis=block_axis), np.arange(length),
                   axis=block_axis)


def _group_reduce(view: np.ndarray, block_axis: int, group_size: int, reduce) -> np.ndarray:
    """reduce(...) of each group along block_axis of a 2-D view; the last group may be partial."""
    length = view.shape[block_axis]
    starts = np.arange(0, length, group_size)
    return reduce.reduceat(view, starts, axis=block_axis)


def symmetric_group_scales(weight: np.ndarray, grid: IntRange, block_axis: int,
                           group_size: int) -> np.ndarray:
    """Scales s = max|w| / qmax per group (blocked layout of the grouped view), as float32."""
    view = np.abs(weight.astype(np.float64)).reshape(grouped_shape(weight.shape))
    amax = _group_reduce(view, block_axis, group_size, np.maximum)
    return np.maximum(amax / grid.qmax, MIN_SCALE).astype(np.float32)


def quantize_groups(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, grid: IntRange,
                    block_axis: int, group_size: int) -> np.ndarray:
    """Codes of x (any shape, grouped view inside) with blocked scales, as QuantizeLinear."""
    view = x.reshape(grouped_shape(x.shape))
    length = view.shape[block_axis]
    s = expand_groups(scale, block_axis, group_size, length)
    z = expand_groups(zero_point, block_axis, group_size, length)
    return quantize(view, s, z, grid).reshape(x.shape)


def dequantize_groups(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, block_axis: int,
                      group_size: int) -> np.ndarray:
    """(q - z) * s with blocked scales, as DequantizeLinear with `block_size`, in float32."""
    view = q.reshape(grouped_shape(q.shape))
    length = view.shape[block_axis]
    s = expand_groups(scale, block_axis, group_size, length)
    z = expand_groups(zero_point, block_axis, group_size, length)
    return dequantize(view, s, z).reshape(q.shape)


def _broadcast(values: np.ndarray | float, ndim: int, axis: int | None) -> np.ndarray:
    values = np.asarray(values)
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis % ndim] = values.size
    return values.reshape(shape)


def quantize(
    x: np.ndarray,
    scale: np.ndarray | float,
    zero_point: np.ndarray | int,
    grid: IntRange,
    axis: int | None = None,
) -> np.ndarray:
    """Integer codes of x, as ONNX QuantizeLinear computes them (round half to even, saturate)."""
    s = _broadcast(np.asarray(scale, np.float32), x.ndim, axis)
    z = _broadcast(np.asarray(zero_point, np.int64), x.ndim, axis)
    codes = np.round(x.astype(np.float32) / s).astype(np.int64) + z
    return np.clip(codes, grid.qmin, grid.qmax).astype(grid.dtype)


def dequantize(
    q: np.ndarray,
    scale: np.ndarray | float,
    zero_point: np.ndarray | int,
    axis: int | None = None,
) -> np.ndarray:
    """Real values (q - z) * s, as ONNX DequantizeLinear computes them, in float32."""
    s = _broadcast(np.asarray(scale, np.float32), q.ndim, axis)
    z = _broadcast(np.asarray(zero_point, np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def fake_quantize(x, scale, zero_point, grid: IntRange, axis: int | None = None) -> np.ndarray:
    """dequantize(quantize(x)): the value a quantized model sees in place of x."""
    return dequantize(quantize(x, scale, zero_point, grid, axis), scale, zero_point, axis)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scales: np.ndarray) -> tuple[
    np.ndarray, np.ndarray
]:
    """int32 bias codes and their scales s_x * s_w (per output channel), zero point 0."""
    scales = (np.float32(input_scale) * weight_scales.astype(np.float32)).astype(np.float32)
    scales = np.maximum(scales, MIN_SCALE).astype(np.float32)
    codes = np.round(bias.astype(np.float64) / scales.astype(np.float64))
    codes = np.clip(codes, INT32.qmin, INT32.qmax).astype(np.int32)
    return codes, scales


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two tensors, flattened, in float64 (1.0 when both are zero)."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    if denominator == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / denominator)


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |ref - approx|^2), in dB."""
    reference = reference.astype(np.float64)
    noise = np.sum((reference - approximation.astype(np.float64)) ** 2)
    signal = np.sum(reference**2)
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))
