"""Insert QuantizeLinear / DequantizeLinear nodes as the plan and parameters say.

For every activation tensor t of a quantized group (one scale/zero point per group):

    producer -> t -> consumers        becomes        producer -> t -> Q -> DQ -> consumers

For every quantized weight W of node n (codes and scales given, never re-rounded here):

    W (float initializer) -> n        becomes        W_q (int8; int4 at 3-4 bits, int2 at 2) -> DQ(axis) -> n

and a bias b becomes an int32 initializer with scale s_x * s_w and zero point 0 behind a DQ.
ORT then fuses DQ -> Conv -> Q into QLinearConv, DQ -> MatMul into MatMulIntegerToFloat, and
drops Q/DQ pairs around chain ops whose input and output share parameters. A tensor that is a
graph output keeps feeding the output in float.

Code storage (`weight_storage`): 5-8 bit codes as int8 / uint8; 3-4 bit codes as int4 / uint4
(two codes per byte, opset 21; 3-bit codes keep their clipped range [-4, 3] in the int4
container); 2-bit codes as int2 / uint2 (four per byte, opset 25), except MatMul weights (see
below), behind a Reshape to the weight's own shape:

    W_q (int2) -> DQ(axis) -> Reshape(shape of W) -> Conv / Gemm / ...

The Reshape changes nothing but keeps ORT's QDQ fusions off the int2 DequantizeLinear, which
they take for int8 and make into kernels that do not load. Measured on ORT 1.32 CPU with all
graph optimizations (`EmitOptions.int2`): DQ(int2) straight into Conv, Gemm or MatMul between
activation Q/DQ pairs fails at session creation ("Type 'tensor(int2)' of input parameter (w)
of operator (QLinearConv) in node () is invalid", likewise QGemm and QLinearMatMul); DQ(int2)
-> MatMul on a float activation fuses into MatMulNBits, which reads a (K, N) weight wrongly
when N is not a multiple of 4 (relative error 1.6); with the Reshape all of these load, run
DequantizeLinear and the float op, and equal the unoptimized graph to the bit. A 2-bit Conv
or Gemm runs the same kernels as in an int4 container (ORT has no integer kernel for either
below 8 bits), so int2 halves its codes for free. A 2-bit MatMul outside MatMulNBits stays
int4: the int4 DQ -> MatMul fuses into MatMulIntegerToFloat, an integer kernel that int2
would lose. Models with int2 codes are written at opset 25.

With `EmitOptions.matmul_nbits`, a 2-4 bit 2-D MatMul weight (K, N) becomes com.microsoft
MatMulNBits (bits b = 4 for 3-4 bit codes, b = 2 for 2-bit codes; block-wise along K):

    x -> [Q -> DQ] -> MatMul(W)        becomes        x -> [Q -> DQ] -> MatMulNBits(B, scales)

B is (N, K_blocks, block_size * b / 8) uint8 holding q = code - zero_point + 2^(b-1), 8 / b
codes per byte, the lowest bits first (b = 4: k = 2j in the low nibble of byte j; b = 2: k =
4j in bits 0-1, 4j + 1 in bits 2-3, ...), the last block padded with q = 2^(b-1), i.e. 0.
Scales (N * K_blocks) repeat the per-channel scale over the K blocks, so
W_hat = (q - 2^(b-1)) * s is exactly the searcher's (codes - z) * s. A symmetric weight gets no
zero_points input: MatMulNBits assumes 2^(b-1) when it is absent. An asymmetric one (a
per-channel zero point, or one per group) gets zero_points z + 2^(b-1) per block, packed like
B's codes, each row padded to whole bytes (N * ceil(K_blocks * b / 8) uint8), with its codes
stored as c + 2^(b-1) (unsigned codes and zero points as they are). ORT 1.32's CPU kernel runs
bits=2 with and without zero points, for any K (the last block partial), at accuracy_level 0
(exact) and 4 (int8 activations).

Group-wise weights (`WeightQuant.group_size` g > 0, scales per g weights along the reduction
axis; onnxq.numerics) keep the same layouts with real per-group scales: a blocked
DequantizeLinear (opset 21, `axis` = the reduction axis of the grouped view, `block_size` = g;
a Conv weight (O, I, kh, kw) is stored as (O, I * kh * kw) and reshaped back behind the DQ),
MatMulNBits with block_size = g and scales (N, ceil(K / g)), GatherBlockQuantized with
block_size = g. Zero points are written only where the spec is asymmetric (MatMulNBits:
z + 2^(b-1) packed 8 / b per byte). The com.microsoft kernels run only block sizes 16-256,
powers of 2 (NBITS_BLOCK_SIZES); another g falls back to the blocked DequantizeLinear container.

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

    matmul_nbits: 2-4 bit 2-D MatMul weights as com.microsoft MatMulNBits (bits=4 for 3-4
        bit codes, bits=2 for 2-bit codes).
    nbits_accuracy_level: MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
        activations inside the kernel).
    nbits_block_size: block size along K; None picks, per layer, the one of
        NBITS_BLOCK_SIZES that gives the fewest bytes (scales repeat over blocks, so the
        block size changes storage and speed, never the dequantized weight).
    nbits_activation_qdq: keep the activation Q -> DQ in front of a MatMulNBits (when False,
        the kernel reads the float activation).
    int2: store 2-bit codes of DQ containers (not MatMul's) as packed int2 (opset 25) behind
        a Reshape that keeps ORT's fusions off them; off: int4 (see the module docstring).
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
    int2: bool = True
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
    NBITS_2 = "MatMulNBits 2-bit"  # 2-bit blocks along K
    GATHER_BLOCKS = "GatherBlockQuantized"  # int4 table, blocks along each row
    GATHER_BLOCKS_8 = "GatherBlockQuantized 8-bit"  # uint8 table, blocks along each row

    @property
    def bits(self) -> int:
        """Bits per stored code."""
        return {Storage.INT8: 8, Storage.INT2: 2, Storage.NBITS_2: 2,
                Storage.GATHER_BLOCKS_8: 8}.get(self, 4)

    @property
    def matmul_nbits(self) -> bool:
        """Whether the codes go into a com.microsoft MatMulNBits."""
        return self in (Storage.NBITS, Storage.NBITS_2)


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
        return Storage.NBITS_2 if grid.bits <= 2 else Storage.NBITS
    if gather_blocks:
        return Storage.GATHER_BLOCKS
    if grid.bits <= 2 and options.int2 and op_type != "MatMul":
        return Storage.INT2
    return Storage.INT4


def storage_dtype(grid: IntRange, storage: Storage | None = None) -> np.dtype:
    """numpy dtype of codes of `grid` in a container: int2 / uint2 (four per byte, opset 25),
    int4 / uint4 (two per byte, opset 21) or int8 / uint8. Without `storage`: int4 up to 4
    bits."""
    storage = storage or (Storage.INT4 if grid.bits <= 4 else Storage.INT8)
    if storage is Storage.INT2:
        return np.dtype(ml_dtypes.int2 if grid.signed else ml_dtypes.uint2)
    if storage in (Storage.INT4, Storage.NBITS, Storage.NBITS_2, Storage.GATHER_BLOCKS):
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


def nbits_block_size(k: int, options: EmitOptions, bits: int = 4) -> int:
    """The configured block size, or the one giving the fewest bytes for K at `bits` per code
    (ties: smaller)."""
    if options.nbits_block_size is not None:
        return options.nbits_block_size
    return min(NBITS_BLOCK_SIZES, key=lambda size: math.ceil(k / size) * (size * bits // 8 + 4))


def _nbits_shifted(codes: np.ndarray, zero_point: np.ndarray, bits: int) -> np.ndarray:
    """c - z + 2^(bits-1) (the kernel's implied zero point), as int16, for (K, N) codes."""
    return (codes.astype(np.int16) - np.asarray(zero_point, np.int16).reshape(1, -1)
            + (1 << (bits - 1)))


def nbits_fits(codes: np.ndarray, zero_point: np.ndarray, bits: int = 4) -> bool:
    """Whether c - z lies in [-2^(bits-1), 2^(bits-1) - 1] everywhere, so MatMulNBits needs no
    zero_points input."""
    shifted = _nbits_shifted(codes, zero_point, bits)
    return bool(shifted.min(initial=0) >= 0 and shifted.max(initial=0) < (1 << bits))


def pack_low_first(values: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) values in [0, 2^bits) -> (..., n * bits / 8) uint8, 8 / bits values per byte,
    the first in the lowest bits (MatMulNBits' layout for B and its zero points)."""
    per_byte = 8 // bits
    groups = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per_byte)
    packed = np.zeros(groups.shape[:-1], np.uint8)
    for position in range(per_byte):
        packed |= groups[..., position] << (bits * position)
    return packed


def pack_nbits(codes: np.ndarray, zero_point: np.ndarray, block_size: int,
               bits: int = 4) -> np.ndarray:
    """(K, N) codes -> MatMulNBits B (N, K_blocks, block_size * bits / 8) uint8 holding
    q = c - z + 2^(bits-1), lowest bits first; the last block is padded with q = 2^(bits-1)
    (zero)."""
    if not nbits_fits(codes, zero_point, bits):
        raise ValueError(f"codes minus zero point must lie in [{-(1 << (bits - 1))}, "
                         f"{(1 << (bits - 1)) - 1}] for MatMulNBits with bits={bits}")
    return pack_nbits_blocks(_nbits_shifted(codes, zero_point, bits), block_size, bits)


def pack_nbits_blocks(q: np.ndarray, block_size: int, bits: int) -> np.ndarray:
    """(K, N) stored values q in [0, 2^bits) -> B (N, K_blocks, block_size * bits / 8), the
    last block padded with 2^(bits-1)."""
    k, n = q.shape
    blocks = math.ceil(k / block_size)
    padded = np.full((n, blocks * block_size), 1 << (bits - 1), np.uint8)
    padded[:, :k] = q.T.astype(np.uint8)
    return pack_low_first(padded.reshape(n, blocks, block_size), bits)


def nbits_layout(spec: WeightQuant, params: WeightParams, block_size: int,
                 bits: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """MatMulNBits' stored values q (K, N) and zero points (N, K_blocks) of a (K, N) weight,
    or None where they do not fit in `bits`. Symmetric: q = c - z + 2^(bits-1) and no zero
    points (the kernel's implied 2^(bits-1)); asymmetric: q = c + o and zero points z + o, with
    o = 2^(bits-1) for signed codes and 0 for unsigned ones. Zero points are per channel, or
    per group (`spec.group_size`, then one block per group)."""
    k, n = params.codes.shape
    blocks = math.ceil(k / block_size)
    zero_point = np.asarray(params.zero_point, np.int16)
    if not spec.group_size:
        zero_point = np.broadcast_to(zero_point.reshape(1, -1), (blocks, n))
    middle = 1 << (bits - 1)
    codes = params.codes.astype(np.int16)
    if spec.symmetric:
        q, zero_points = codes - np.repeat(zero_point, block_size, axis=0)[:k] + middle, None
    else:
        offset = middle if spec.grid.signed else 0
        q, zero_points = codes + offset, np.ascontiguousarray(zero_point.T) + offset
    stored = [q] if zero_points is None else [q, zero_points]
    if any(a.min(initial=0) < 0 or a.max(initial=0) >= 1 << bits for a in stored):
        return None
    return q, zero_points


def pack_zero_point_rows(values: np.ndarray, bits: int = 4) -> np.ndarray:
    """(rows, n) values in [0, 2^bits) -> rows * ceil(n * bits / 8) uint8, lowest bits first,
    each row padded to whole bytes (MatMulNBits' zero_points layout)."""
    rows, n = values.shape
    per_byte = 8 // bits
    padded = np.zeros((rows, math.ceil(n / per_byte) * per_byte), np.uint8)
    padded[:, :n] = values
    return pack_low_first(padded, bits).reshape(-1)


def spec_storage(node: ir.Node, spec: WeightQuant, params: WeightParams,
                 options: EmitOptions) -> Storage:
    """`weight_storage` for one planned weight; MatMulNBits only where its codes and zero
    points fit the kernel's bits (`nbits_layout`), else the DQ containers; int2 only where the
    zero points lie on the 2-bit grid (the codes always do), else int4."""
    shape, group = params.codes.shape, spec.group_size
    storage = weight_storage(node.op_type, shape, spec.axis, spec.grid, options, group)
    if storage.matmul_nbits and (spec.input_index != 1 or nbits_layout(
            spec, params, group or nbits_block_size(shape[0], options, storage.bits),
            storage.bits) is None):
        options = dataclasses.replace(options, matmul_nbits=False)
        storage = weight_storage(node.op_type, shape, spec.axis, spec.grid, options, group)
    zero_point = np.asarray(params.zero_point)
    if storage is Storage.INT2 and (zero_point.min(initial=spec.grid.qmin) < spec.grid.qmin
                                    or zero_point.max(initial=spec.grid.qmax) > spec.grid.qmax):
        storage = Storage.INT4
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
            if storage.matmul_nbits:
                nodes[spec.node] = self._matmul_nbits(model, node, spec, params, storage, stem)
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
            if storage is Storage.INT2:  # keeps ORT's QDQ fusions off the int2 codes
                dequantized = self._reshape(graph, node, dequantized, params.codes.shape, stem)
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
        points only where asymmetric), reshaped back to the weight's shape for a Conv, and
        for int2 codes (which the Reshape keeps away from ORT's QDQ fusions)."""
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
        if tuple(view) == tuple(params.codes.shape) and storage is not Storage.INT2:
            return dequantize.outputs[0]
        return self._reshape(graph, node, dequantize.outputs[0], params.codes.shape, stem)

    @staticmethod
    def _reshape(graph: ir.Graph, node: ir.Node, value: ir.Value, shape: tuple[int, ...],
                 stem: str) -> ir.Value:
        """`value` reshaped to `shape` by a Reshape inserted before `node`."""
        target = _initializer(graph, f"{stem}_shape", np.asarray(shape, np.int64))
        name = f"{stem}_dq_{len(shape)}d"
        reshape = ir.Node("", "Reshape", [value, target], outputs=[ir.Value(name=name)], name=name)
        graph.insert_before(node, reshape)
        return reshape.outputs[0]

    def _matmul_nbits(self, model: ir.Model, node: ir.Node, spec: WeightQuant,
                      params: WeightParams, storage: Storage, stem: str) -> ir.Node:
        """Replace MatMul(x, W) by MatMulNBits(x, B, scales[, zero points]) holding W's codes
        and scales at the storage's bits."""
        graph = model.graph
        k, n = params.codes.shape
        block = spec.group_size or nbits_block_size(k, self.options, storage.bits)
        inputs = self._nbits_inputs(graph, spec, params, block, storage.bits, stem)
        activation = node.inputs[0]
        if not self.options.nbits_activation_qdq:
            activation = before_qdq(activation)
        attributes = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", storage.bits),
                      ir.AttrInt64("block_size", block),
                      ir.AttrInt64("accuracy_level", self.options.nbits_accuracy_level)]
        replacement = ir.Node(NBITS_DOMAIN, "MatMulNBits", [activation, *inputs],
                              attributes, num_outputs=1, name=node.name)
        model.opset_imports.setdefault(NBITS_DOMAIN, 1)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement],
                                                node.outputs, replacement.outputs)
        return replacement

    @staticmethod
    def _nbits_inputs(graph: ir.Graph, spec: WeightQuant, params: WeightParams, block: int,
                      bits: int, stem: str) -> list[ir.Value]:
        """MatMulNBits' B, scales (N * blocks) and, where asymmetric, zero points
        (`nbits_layout`); per channel, the scale repeated per block; group-wise, each group a
        block."""
        k, n = params.codes.shape
        q, zero_points = nbits_layout(spec, params, block, bits)
        if spec.group_size:
            scales = np.ascontiguousarray(params.scale.T, np.float32).reshape(-1)  # (N, blocks)
        else:
            scale = np.broadcast_to(np.asarray(params.scale, np.float32).reshape(-1), (n,))
            scales = np.repeat(scale, math.ceil(k / block)).astype(np.float32)
        inputs = [_initializer(graph, f"{stem}_q", pack_nbits_blocks(q, block, bits)),
                  _initializer(graph, f"{stem}_s", scales)]
        if zero_points is not None:
            inputs.append(_initializer(graph, f"{stem}_zp", pack_zero_point_rows(zero_points, bits)))
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
