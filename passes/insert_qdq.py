"""Insert QuantizeLinear / DequantizeLinear nodes as the plan and parameters say.

For every activation tensor t of a quantized group (one scale/zero point per group):

    producer -> t -> consumers        becomes        producer -> t -> Q -> DQ -> consumers

For every quantized weight W of node n (codes and scales given, never re-rounded here):

    W (float initializer) -> n        becomes        W_q (int8, or int4 below 5 bits) -> DQ(axis) -> n

and a bias b becomes an int32 initializer with scale s_x * s_w and zero point 0 behind a DQ.
ORT then fuses DQ -> Conv -> Q into QLinearConv, DQ -> MatMul into MatMulIntegerToFloat, and
drops Q/DQ pairs around chain ops whose input and output share parameters. A tensor that is a
graph output keeps feeding the output in float.

Code storage (`weight_storage`): 5-8 bit codes as int8 / uint8; 2-4 bit codes as int4 / uint4
(two codes per byte, opset 21; 2- and 3-bit codes keep their clipped ranges [-2, 1] / [-4, 3]
in the int4 container). Packed int2 (four per byte, opset 25) is opt-in (`EmitOptions.int2`)
and off by default: ONNX Runtime 1.31 runs DequantizeLinear on int2 by itself, but its QDQ
fusions take int2 for int8 (DQ(int2) -> Conv -> Q becomes a QLinearConv, likewise QGemm and
QLinearMatMul, which then fail to load), and its DQ(int2) -> MatMul -> MatMulNBits fusion
reads a (K, N) weight wrongly when N is not a multiple of 4 (those stay int4 even when
opted in).

With `EmitOptions.matmul_nbits`, a 2-4 bit 2-D MatMul weight (K, N) becomes com.microsoft
MatMulNBits (bits=4, block-wise along K):

    x -> [Q -> DQ] -> MatMul(W)        becomes        x -> [Q -> DQ] -> MatMulNBits(B, scales)

B is (N, K_blocks, block_size / 2) uint8 holding q = code - zero_point + 8 (low nibble first,
the last block padded with q = 8, i.e. 0), and scales (N * K_blocks) repeat the per-channel
scale over the K blocks, so W_hat = (q - 8) * s is exactly the searcher's (codes - z) * s.
No zero_points input: MatMulNBits assumes 8 when it is absent.

Group-wise weights (`WeightQuant.group_size` g > 0, scales per g weights along the reduction
axis; onnxq.numerics) keep the same layouts with real per-group scales: a blocked
DequantizeLinear (opset 21, `axis` = the reduction axis of the grouped view, `block_size` = g;
a Conv weight (O, I, kh, kw) is stored as (O, I * kh * kw) and reshaped back behind the DQ),
MatMulNBits with block_size = g and scales (N, ceil(K / g)), GatherBlockQuantized with
block_size = g. Zero points are written only where the spec is asymmetric (MatMulNBits: z + 8
packed two per byte). The com.microsoft kernels run only block sizes 16-256, powers of 2
(NBITS_BLOCK_SIZES); another g falls back to the blocked DequantizeLinear container.

An embedding table T (V, D) read by Gather(axis 0) with per-row scales becomes
com.microsoft GatherBlockQuantized (`EmitOptions.gather_block_quantized`), which dequantizes
only the rows it gathers (a DQ -> Gather dequantizes the whole table on every run):

    T_q -> DQ(axis 0) -> Gather(ids)   becomes   GatherBlockQuantized(T_q, ids, scales)

with blocks of bs | D along each row (quantize_axis 1) and scales (V, D / bs) repeating each
row's scale. 2-4 bit codes are int4 (bits=4), zero points (int4, same shape) only where they are
not all 0. 5-8 bit codes are uint8 (bits=8, the only 8-bit type ORT 1.32's kernel takes):
signed codes c are stored as c + 128 and their zero point as z + 128, the kernel's default when
the zero_points input is absent, so a symmetric table (z = 0) needs none. 7-bit codes
(reduce_range) are stored the same way.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxq import numerics
from onnxq.numerics import IntRange
from onnxq.plan import QuantPlan, WeightQuant
from onnxq.qparams import QParams, WeightParams

logger = logging.getLogger(__name__)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        values.update({v.name: v for v in node.outputs})
    return values


INT2_MIN_OPSET = 25  # int2 / uint2 DequantizeLinear inputs
NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)  # block sizes with MLAS MatMulNBits kernels
NBITS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class EmitOptions:
    """How the emitter lays out weights; never what their values are.

    matmul_nbits: 2-4 bit 2-D MatMul weights as com.microsoft MatMulNBits (bits=4).
    nbits_accuracy_level: MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
        activations inside the kernel).
    nbits_block_size: block size along K; None picks, per layer, the one of
        NBITS_BLOCK_SIZES that gives the fewest bytes (scales repeat over blocks, so the
        block size changes storage and speed, never the dequantized weight).
    nbits_activation_qdq: keep the activation Q -> DQ in front of a MatMulNBits (when False,
        the kernel reads the float activation).
    int2: store 2-bit codes as packed int2 (opset 25). Off: ORT 1.31 cannot load the fused
        integer kernels it makes of them (see the module docstring).
    gather_block_quantized: an embedding table (Gather along axis 0, per-row scales) as
        com.microsoft GatherBlockQuantized (bits=4 up to 4 bits, bits=8 above), which
        dequantizes only the gathered rows; a DQ -> Gather dequantizes the whole table on every
        run (MiniLM: ~10 ms of a 25 ms run).
    dynamic_uint8_weights: dynamic layers store their codes as uint8 (code + 128, zero point
        + 128), for CPUs whose u8 x s8 kernels saturate (onnxq.passes.dynamic_quantize).
    low_bit_convs_int8: Conv / ConvTranspose codes below 8 bits (per channel) in an int8
        container, which ORT runs as QLinearConv; int4 has no integer Conv kernel in ORT 1.32
        (`conv_storage = "fast"`).
    """

    matmul_nbits: bool = False
    nbits_accuracy_level: int = 4
    nbits_block_size: int | None = None
    nbits_activation_qdq: bool = False
    int2: bool = False
    gather_block_quantized: bool = True
    dynamic_uint8_weights: bool = False
    low_bit_convs_int8: bool = False

    def __post_init__(self) -> None:
        if self.nbits_accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"nbits_accuracy_level must be 0 to 4, got {self.nbits_accuracy_level}")
        if self.nbits_block_size is not None and self.nbits_block_size not in NBITS_BLOCK_SIZES:
            raise ValueError(f"nbits_block_size must be one of {NBITS_BLOCK_SIZES}, "
                             f"got {self.nbits_block_size}")


class Storage(enum.Enum):
    """How a weight's codes are written: a DQ container, or a com.microsoft block kernel."""

    INT8 = "int8"
    INT4 = "int4"
    INT2 = "int2"
    NBITS = "MatMulNBits"  # 4-bit blocks along K
    GATHER_BLOCKS = "GatherBlockQuantized"  # int4 table, blocks along each row
    GATHER_BLOCKS_8 = "GatherBlockQuantized 8-bit"  # uint8 table, blocks along each row

    @property
    def bits(self) -> int:
        """Bits per stored code."""
        return {Storage.INT8: 8, Storage.INT2: 2, Storage.GATHER_BLOCKS_8: 8}.get(self, 4)


def weight_storage(op_type: str, shape: tuple[int, ...], axis: int | None, grid: IntRange,
                   options: EmitOptions, group_size: int = 0) -> Storage:
    """The container of a weight's codes (see the module docstring). Group-wise weights take
    the com.microsoft block kernels only with a group size they run (NBITS_BLOCK_SIZES), else
    a blocked DQ container."""
    kernel_blocks = not group_size or group_size in NBITS_BLOCK_SIZES
    gather_blocks = (options.gather_block_quantized and op_type == "Gather" and len(shape) == 2
                     and axis in (None, 0) and kernel_blocks
                     and bool(group_size or gather_block_size(shape[1]) is not None))
    if grid.bits > 4:
        return Storage.GATHER_BLOCKS_8 if gather_blocks else Storage.INT8
    if options.low_bit_convs_int8 and op_type in ("Conv", "ConvTranspose") and not group_size:
        return Storage.INT8
    if (options.matmul_nbits and op_type == "MatMul" and len(shape) == 2
            and (axis is None or axis % 2 == 1) and kernel_blocks):
        return Storage.NBITS
    if gather_blocks:
        return Storage.GATHER_BLOCKS
    if grid.bits <= 2 and options.int2 and not (op_type == "MatMul" and shape[-1] % 4):
        return Storage.INT2
    return Storage.INT4


def storage_dtype(grid: IntRange, storage: Storage | None = None) -> np.dtype:
    """numpy dtype of codes of `grid` in a container: int2 / uint2 (four per byte, opset 25),
    int4 / uint4 (two per byte, opset 21) or int8 / uint8. Without `storage`: int4 up to 4
    bits."""
    storage = storage or (Storage.INT4 if grid.bits <= 4 else Storage.INT8)
    if storage is Storage.INT2:
        return np.dtype(ml_dtypes.int2 if grid.signed else ml_dtypes.uint2)
    if storage in (Storage.INT4, Storage.NBITS, Storage.GATHER_BLOCKS):
        return np.dtype(ml_dtypes.int4 if grid.signed else ml_dtypes.uint4)
    return grid.dtype


def gather_block_size(row: int) -> int | None:
    """The largest block size of NBITS_BLOCK_SIZES dividing a table's row length, if any."""
    sizes = [size for size in NBITS_BLOCK_SIZES if row % size == 0]
    return max(sizes) if sizes else None


def gather_block_codes(params: WeightParams, grid: IntRange,
                       storage: Storage) -> tuple[np.ndarray, np.ndarray, int]:
    """A GatherBlockQuantized table's stored codes, its zero points (per row, or per group as
    (rows, groups)) and the zero point the kernel assumes without a zero_points input: int4
    codes with 0; for 8 bits, uint8 codes (c + 128 when signed) with 128."""
    zero_point = np.asarray(params.zero_point)
    zero_point = zero_point.reshape(-1) if zero_point.ndim <= 1 else zero_point
    if storage is Storage.GATHER_BLOCKS:
        dtype = storage_dtype(grid, Storage.GATHER_BLOCKS)
        return params.codes.astype(dtype), zero_point.astype(dtype), 0
    shift = 128 if grid.signed else 0
    return ((params.codes.astype(np.int16) + shift).astype(np.uint8),
            (zero_point.astype(np.int16) + shift).astype(np.uint8), 128)


def nbits_block_size(k: int, options: EmitOptions) -> int:
    """The configured block size, or the one giving the fewest bytes for K (ties: smaller)."""
    if options.nbits_block_size is not None:
        return options.nbits_block_size
    return min(NBITS_BLOCK_SIZES, key=lambda size: math.ceil(k / size) * (size // 2 + 4))


def _nbits_shifted(codes: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """c - z + 8 (the kernel's implied zero point is 8), as int16, for (K, N) codes."""
    return codes.astype(np.int16) - np.asarray(zero_point, np.int16).reshape(1, -1) + 8


def nbits_fits(codes: np.ndarray, zero_point: np.ndarray) -> bool:
    """Whether c - z lies in [-8, 7] everywhere, so MatMulNBits needs no zero_points input."""
    shifted = _nbits_shifted(codes, zero_point)
    return bool(shifted.min(initial=8) >= 0 and shifted.max(initial=8) <= 15)


def pack_nbits(codes: np.ndarray, zero_point: np.ndarray, block_size: int) -> np.ndarray:
    """(K, N) codes -> MatMulNBits B (N, K_blocks, block_size / 2) uint8 holding q = c - z + 8,
    low nibble first; the last block is padded with q = 8 (zero)."""
    k, n = codes.shape
    blocks = math.ceil(k / block_size)
    shifted = _nbits_shifted(codes, zero_point)
    if shifted.min(initial=8) < 0 or shifted.max(initial=8) > 15:
        raise ValueError("codes minus zero point must lie in [-8, 7] for MatMulNBits")
    q = np.full((n, blocks * block_size), 8, np.uint8)
    q[:, :k] = shifted.T.astype(np.uint8)
    q = q.reshape(n, blocks, block_size // 2, 2)
    return (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)


def pack_nibble_rows(values: np.ndarray) -> np.ndarray:
    """(rows, n) values in [0, 15] -> rows * ceil(n / 2) uint8, low nibble first, each row
    padded to whole bytes (MatMulNBits' zero_points layout)."""
    rows, n = values.shape
    padded = np.zeros((rows, n + n % 2), np.uint8)
    padded[:, :n] = values
    pairs = padded.reshape(rows, -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8).reshape(-1)


def spec_storage(node: ir.Node, spec: WeightQuant, params: WeightParams,
                 options: EmitOptions) -> Storage:
    """`weight_storage` for one planned weight; MatMulNBits only where its implied zero point
    (8) can express the codes (c - z in [-8, 7]), else the DQ containers."""
    shape, group = params.codes.shape, spec.group_size
    storage = weight_storage(node.op_type, shape, spec.axis, spec.grid, options, group)
    if storage is Storage.NBITS and (spec.input_index != 1 or not (
            group or nbits_fits(params.codes, params.zero_point))):  # groups write zero points
        storage = weight_storage(node.op_type, shape, spec.axis, spec.grid,
                                 dataclasses.replace(options, matmul_nbits=False), group)
    return storage


def required_opset(model: ir.Model, plan: QuantPlan, qparams: QParams,
                   options: EmitOptions) -> int:
    """The default-domain opset the weight containers need: 25 for int2, 21 for int4 or a
    blocked (group-wise) DequantizeLinear, else 13 (per-channel DequantizeLinear)."""
    nodes = {node.name: node for node in model.graph}
    needed = 13
    for spec in plan.weights:
        storage = spec_storage(nodes[spec.node], spec, qparams.weights[spec], options)
        needed = max(needed, {Storage.INT2: INT2_MIN_OPSET, Storage.INT4: 21}.get(storage, 13))
        if spec.group_size and storage in (Storage.INT8, Storage.INT4):
            needed = max(needed, 21)
    return needed


def before_qdq(value: ir.Value) -> ir.Value:
    """The float tensor in front of a Q -> DQ pair ending in `value` (else `value` itself)."""
    dequantize = value.producer()
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return value
    quantize = dequantize.inputs[0].producer()
    if quantize is None or quantize.op_type != "QuantizeLinear":
        return value
    return quantize.inputs[0]


def _unique_stem(graph: ir.Graph, stem: str) -> str:
    """`stem`, or `stem_N` when a weight used by several nodes was already quantized."""
    candidate, count = stem, 1
    while f"{candidate}_q" in graph.initializers:
        candidate, count = f"{stem}_{count}", count + 1
    return candidate


class InsertQDQPass(ir.passes.InPlacePass):
    """Rewrite a prepared model with the Q/DQ nodes of `plan` and `qparams`."""

    def __init__(self, plan: QuantPlan, qparams: QParams,
                 options: EmitOptions | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.qparams = qparams
        self.options = options or EmitOptions()

    def requires(self, model: ir.Model) -> None:
        needed = required_opset(model, self.plan, self.qparams, self.options)
        opset = model.opset_imports.get("", 1)
        if opset < needed:
            raise ValueError(f"the plan's weight containers need opset {needed}, the model has "
                             f"{opset}: prepare (or emit) the model at opset {needed}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = _values_by_name(graph)
        nodes = {node.name: node for node in graph}
        for group in self.plan.activation_groups:
            params = self.qparams.activations[group.stats_tensor]
            scale = _initializer(graph, f"{group.stats_tensor}_s", np.float32(params.scale))
            zero_point = _initializer(graph, f"{group.stats_tensor}_zp",
                                      np.asarray(params.zero_point, dtype=group.grid.dtype))
            for tensor in group.tensors:
                self._insert_pair(graph, values[tensor], scale, zero_point)
        weight_scales = {}
        for spec in self.plan.weights:
            params = self.qparams.weights[spec]
            node = nodes[spec.node]
            stem = _unique_stem(graph, spec.tensor)
            weight_scales[spec.node] = params.channel_scales()
            storage = spec_storage(node, spec, params, self.options)
            if storage is Storage.NBITS:
                nodes[spec.node] = self._matmul_nbits(model, node, spec, params, stem)
                continue
            if storage in (Storage.GATHER_BLOCKS, Storage.GATHER_BLOCKS_8):
                nodes[spec.node] = self._gather_blocks(model, node, spec, params, stem, storage)
                continue
            if spec.group_size:
                node.replace_input_with(spec.input_index,
                                        self._grouped_dequantize(graph, node, spec, params, storage, stem))
                continue
            dtype = storage_dtype(spec.grid, storage)
            codes = _initializer(graph, f"{stem}_q", params.codes.astype(dtype))
            scale = _initializer(graph, f"{stem}_s", params.scale.astype(np.float32))
            zero_point = _initializer(graph, f"{stem}_zp", params.zero_point.astype(dtype))
            dequantized = self._dequantize(graph, node, [codes, scale, zero_point], spec.axis,
                                           f"{stem}_dq")
            node.replace_input_with(spec.input_index, dequantized)
        for spec in self.plan.biases:
            node = nodes[spec.node]
            group = self.plan.group_of(spec.activation)
            input_scale = self.qparams.activations[group.stats_tensor].scale
            bias = self.qparams.bias_values.get(spec)
            if bias is None:
                bias = values[spec.tensor].const_value.numpy()
            codes, scales = numerics.quantize_bias(bias, input_scale, weight_scales[spec.node])
            stem = _unique_stem(graph, spec.tensor)
            axis = 0 if scales.ndim == 1 and scales.size > 1 else None
            scales = scales if axis is not None else scales.reshape(())
            # int32 bias: zero point 0, which DequantizeLinear assumes when absent.
            dequantized = self._dequantize(
                graph, node, [_initializer(graph, f"{stem}_q", codes),
                              _initializer(graph, f"{stem}_s", scales)], axis, f"{stem}_dq")
            node.replace_input_with(spec.input_index, dequantized)
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        modified = bool(self.plan.activation_groups or self.plan.weights)
        return ir.passes.PassResult(model, modified=modified)

    def _grouped_dequantize(self, graph: ir.Graph, node: ir.Node, spec: WeightQuant,
                            params: WeightParams, storage: Storage, stem: str) -> ir.Value:
        """DQ(axis = block_axis, block_size = g) of the codes in their grouped view (zero
        points only where asymmetric), reshaped back to the weight's shape for a Conv."""
        dtype = storage_dtype(spec.grid, storage)
        view = numerics.grouped_shape(params.codes.shape)
        inputs = [_initializer(graph, f"{stem}_q", params.codes.reshape(view).astype(dtype)),
                  _initializer(graph, f"{stem}_s", params.scale.astype(np.float32))]
        if not spec.symmetric:
            inputs.append(_initializer(graph, f"{stem}_zp", params.zero_point.astype(dtype)))
        attributes = [ir.AttrInt64("axis", spec.block_axis), ir.AttrInt64("block_size", spec.group_size)]
        dequantize = ir.Node("", "DequantizeLinear", inputs, attributes,
                             outputs=[ir.Value(name=f"{stem}_dq")], name=f"{stem}_dq")
        graph.insert_before(node, dequantize)
        if tuple(view) == tuple(params.codes.shape):
            return dequantize.outputs[0]
        shape = _initializer(graph, f"{stem}_shape", np.asarray(params.codes.shape, np.int64))
        reshape = ir.Node("", "Reshape", [dequantize.outputs[0], shape],
                          outputs=[ir.Value(name=f"{stem}_dq_4d")], name=f"{stem}_dq_4d")
        graph.insert_before(node, reshape)
        return reshape.outputs[0]

    def _matmul_nbits(self, model: ir.Model, node: ir.Node, spec: WeightQuant,
                      params: WeightParams, stem: str) -> ir.Node:
        """Replace MatMul(x, W) by MatMulNBits(x, B, scales) holding W's codes and scales."""
        graph = model.graph
        k, n = params.codes.shape
        inputs = self._nbits_inputs(graph, spec, params, stem)
        activation = node.inputs[0]
        if not self.options.nbits_activation_qdq:
            activation = before_qdq(activation)
        attributes = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", 4),
                      ir.AttrInt64("block_size", spec.group_size or nbits_block_size(k, self.options)),
                      ir.AttrInt64("accuracy_level", self.options.nbits_accuracy_level)]
        replacement = ir.Node(NBITS_DOMAIN, "MatMulNBits", [activation, *inputs],
                              attributes, num_outputs=1, name=node.name)
        model.opset_imports.setdefault(NBITS_DOMAIN, 1)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement],
                                                node.outputs, replacement.outputs)
        return replacement

    def _nbits_inputs(self, graph: ir.Graph, spec: WeightQuant, params: WeightParams,
                      stem: str) -> list[ir.Value]:
        """MatMulNBits' B and scales (N * blocks); per channel, the scale repeated per block
        and no zero points (implied 8); group-wise, each group a block, and zero points
        (z + 8, packed two per byte, each row padded to whole bytes) where asymmetric."""
        k, n = params.codes.shape
        if not spec.group_size:
            block = nbits_block_size(k, self.options)
            zero_point = np.broadcast_to(np.asarray(params.zero_point).reshape(-1), (n,))
            scale = np.broadcast_to(np.asarray(params.scale, np.float32).reshape(-1), (n,))
            return [_initializer(graph, f"{stem}_q", pack_nbits(params.codes, zero_point, block)),
                    _initializer(graph, f"{stem}_s",
                                 np.repeat(scale, math.ceil(k / block)).astype(np.float32))]
        zero_point = np.asarray(params.zero_point, np.int16)  # (blocks, N)
        packed = pack_nbits(params.codes, np.zeros(n, np.int16), spec.group_size)  # q = c + 8
        scales = np.ascontiguousarray(params.scale.T, np.float32).reshape(-1)  # (N, blocks)
        inputs = [_initializer(graph, f"{stem}_q", packed), _initializer(graph, f"{stem}_s", scales)]
        if not spec.symmetric:
            inputs.append(_initializer(graph, f"{stem}_zp", pack_nibble_rows(zero_point.T + 8)))
        return inputs

    def _gather_blocks(self, model: ir.Model, node: ir.Node, spec: WeightQuant,
                       params: WeightParams, stem: str, storage: Storage) -> ir.Node:
        """Replace Gather(T, ids) by GatherBlockQuantized(T_q, ids, scales[, zero points])."""
        graph = model.graph
        rows, row = params.codes.shape
        block = spec.group_size or gather_block_size(row)
        blocks = row // block

        def per_block(values: np.ndarray, dtype) -> np.ndarray:
            if spec.group_size:  # already (rows, ceil(row / block))
                return np.asarray(values).astype(dtype)
            values = np.broadcast_to(np.asarray(values).reshape(-1, 1), (rows, 1))
            return np.repeat(values, blocks, axis=1).astype(dtype)

        codes, zero_point, default_zero_point = gather_block_codes(params, spec.grid, storage)
        inputs = [_initializer(graph, f"{stem}_q", codes), node.inputs[1],
                  _initializer(graph, f"{stem}_s", per_block(params.scale, np.float32))]
        if np.any(zero_point != default_zero_point):
            inputs.append(_initializer(graph, f"{stem}_zp", per_block(zero_point, codes.dtype)))
        attributes = [ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1),
                      ir.AttrInt64("block_size", block), ir.AttrInt64("bits", storage.bits)]
        replacement = ir.Node(NBITS_DOMAIN, "GatherBlockQuantized", inputs, attributes,
                              num_outputs=1, name=node.name)
        model.opset_imports.setdefault(NBITS_DOMAIN, 1)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement],
                                                node.outputs, replacement.outputs)
        return replacement

    @staticmethod
    def _insert_pair(graph: ir.Graph, value: ir.Value, scale: ir.Value,
                     zero_point: ir.Value) -> None:
        dequantized = ir.Value(name=f"{value.name}_dq", shape=value.shape, type=value.type)
        for use in list(value.uses()):  # a graph output keeps the float value
            use.node.replace_input_with(use.idx, dequantized)
        quantize = ir.Node("", "QuantizeLinear", [value, scale, zero_point],
                           outputs=[ir.Value(name=f"{value.name}_q")], name=f"{value.name}_q")
        dequantize = ir.Node("", "DequantizeLinear", [quantize.outputs[0], scale, zero_point],
                             outputs=[dequantized], name=f"{value.name}_dq")
        graph.append(quantize)
        graph.append(dequantize)

    @staticmethod
    def _dequantize(graph: ir.Graph, node: ir.Node, inputs: list[ir.Value], axis: int | None,
                    name: str) -> ir.Value:
        attributes = [ir.AttrInt64("axis", axis)] if axis is not None else []
        dequantize = ir.Node("", "DequantizeLinear", inputs, attributes,
                             outputs=[ir.Value(name=name)], name=name)
        graph.insert_before(node, dequantize)
        return dequantize.outputs[0]
