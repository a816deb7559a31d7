"""Gram matrices H = X^T X of layer inputs, streamed over calibration feeds.

A layer's reconstruction error ||X W^T - X Q^T||^2 depends on the data only through
H = X^T X, where each row of X is one input vector the layer's weight rows are dotted with:

    MatMul (x @ B, B: K x N)        rows of x reshaped to (-1, K); weight rows B^T (N x K)
    Gemm   (x @ B or x @ B^T)       rows of x (M x K); weight rows B^T or B
    Conv   (W: O x C/g x k...)      im2col patches of x per group g, (C/g * prod k) long,
                                    against weight rows W[g's outputs].reshape(O/g, -1)

H is accumulated feed by feed (float64), so memory is O(d_in^2) per layer whatever the number
of feeds; Conv patches are built per feed with numpy's sliding windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.calibration.bias_correction import RunningChannelMean
from onnxq.passes.op_table import gemm_weight_axis


@dataclass(frozen=True)
class ConvGeometry:
    """What im2col needs of a Conv node."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end...
    group: int
    auto_pad: str

    @classmethod
    def of(cls, node: ir.Node, weight_shape: tuple[int, ...]) -> ConvGeometry:
        kernel = tuple(weight_shape[2:])
        spatial = len(kernel)

        def ints(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
            attribute = node.attributes.get(name)
            return tuple(attribute.as_ints()) if attribute is not None else default

        auto_pad = node.attributes.get("auto_pad")
        return cls(kernel=kernel, strides=ints("strides", (1,) * spatial),
                   dilations=ints("dilations", (1,) * spatial), pads=ints("pads", (0,) * 2 * spatial),
                   group=node.attributes["group"].as_int() if "group" in node.attributes else 1,
                   auto_pad=auto_pad.as_string() if auto_pad is not None else "NOTSET")

    def resolved_pads(self, spatial_shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        """(begin, end) padding per spatial axis, auto_pad resolved."""
        if self.auto_pad in ("NOTSET", ""):
            n = len(self.kernel)
            return tuple((self.pads[i], self.pads[i + n]) for i in range(n))
        if self.auto_pad == "VALID":
            return tuple((0, 0) for _ in self.kernel)
        pads = []
        for size, k, s, d in zip(spatial_shape, self.kernel, self.strides, self.dilations, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if self.auto_pad == "SAME_UPPER" else (large, small))
        return tuple(pads)


def conv_patches(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """im2col: (groups, N * out positions, C/g * prod(kernel)), in the weight's flattening order."""
    batch, channels = x.shape[:2]
    spatial = x.shape[2:]
    pads = geometry.resolved_pads(spatial)
    padded = np.pad(x, [(0, 0), (0, 0), *pads])
    window = tuple((k - 1) * d + 1 for k, d in zip(geometry.kernel, geometry.dilations, strict=True))
    views = np.lib.stride_tricks.sliding_window_view(padded, window, axis=tuple(range(2, x.ndim)))
    # views: (N, C, out..., window...); take strides on out axes and dilations on window axes
    n = len(geometry.kernel)
    out_slices = tuple(slice(None, None, s) for s in geometry.strides)
    win_slices = tuple(slice(None, None, d) for d in geometry.dilations)
    views = views[(slice(None), slice(None), *out_slices, *win_slices)]
    out_shape = views.shape[2:2 + n]
    # (N, out..., C, k...) -> (N * out, g, C/g * k)
    order = (0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
    patches = views.transpose(order).reshape(batch * int(np.prod(out_shape)), channels, -1)
    group_channels = channels // geometry.group
    patches = patches.reshape(patches.shape[0], geometry.group, group_channels * patches.shape[-1])
    return patches.transpose(1, 0, 2)


class GramAccumulator:
    """Streams one layer's inputs into H (groups, d_in, d_in).

    A feed contributes at most `max_rows` input vectors, taken at an even stride over its rows
    (a large image gives a Conv tens of thousands of patches that mostly repeat): H's scale
    does not matter to the search, only its shape, which a strided sample keeps.
    """

    def __init__(self, node: ir.Node, weight: np.ndarray, max_rows: int = 4096) -> None:
        self.max_rows = max_rows
        self.op_type = node.op_type
        self.geometry = ConvGeometry.of(node, weight.shape) if node.op_type == "Conv" else None
        self.hessian: np.ndarray | None = None
        self.rows = 0

    def update(self, x: np.ndarray) -> None:
        self._accumulate(self.sampled_patches(x))

    def _accumulate(self, patches: np.ndarray) -> None:
        gram = np.matmul(patches.transpose(0, 2, 1), patches).astype(np.float64)
        self.hessian = gram if self.hessian is None else self.hessian + gram
        self.rows += patches.shape[1]

    def sampled_patches(self, x: np.ndarray) -> np.ndarray:
        """The feed's input vectors (groups, rows, d_in), at most `max_rows` per group, at an even
        stride (the same rows for any two inputs of one shape)."""
        x = np.asarray(x, np.float32)
        if self.geometry is not None:
            patches = conv_patches(x, self.geometry)
        else:
            patches = x.reshape(1, -1, x.shape[-1])
        stride = -(-patches.shape[1] // self.max_rows)
        return np.ascontiguousarray(patches[:, ::stride])


class PairedGramAccumulator(GramAccumulator):
    """Streams a layer's inputs in two models run on the same feeds: the quantized model's
    (x_q) and the float model's (x). Keeps H = X_q^T X_q (`hessian`, what COMQ searches
    with), the cross product C = X_q^T X (`cross`) and the quantized input's channel means."""

    def __init__(self, node: ir.Node, weight: np.ndarray, max_rows: int = 4096) -> None:
        super().__init__(node, weight, max_rows)
        self.cross: np.ndarray | None = None
        self.quantized_mean = RunningChannelMean(1 if node.op_type == "Conv" else -1)

    def update_pair(self, quantized: np.ndarray, reference: np.ndarray) -> None:
        if np.shape(quantized) != np.shape(reference):
            raise ValueError(f"paired inputs differ in shape: {np.shape(quantized)}, {np.shape(reference)}")
        sampled_q, sampled = self.sampled_patches(quantized), self.sampled_patches(reference)
        self._accumulate(sampled_q)
        self.quantized_mean.update(quantized)
        cross = np.matmul(sampled_q.transpose(0, 2, 1), sampled).astype(np.float64)
        self.cross = cross if self.cross is None else self.cross + cross


def weight_rows(node: ir.Node, weight: np.ndarray, group: int = 1) -> np.ndarray:
    """The layer's weight as rows dotted with input vectors: (groups, d_out / g, d_in)."""
    if node.op_type == "Conv":
        out_channels = weight.shape[0]
        return weight.reshape(group, out_channels // group, -1)
    if node.op_type == "Gemm":
        rows = weight if gemm_weight_axis(node) == 0 else weight.T
        return rows[None]
    return weight.T[None]  # MatMul: B is (K, N)


def weight_from_rows(node: ir.Node, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `weight_rows`: back to the initializer's layout."""
    if node.op_type == "Conv":
        return rows.reshape(shape)
    if node.op_type == "Gemm":
        return rows[0] if gemm_weight_axis(node) == 0 else rows[0].T
    return rows[0].T
