"""Bytes on disk per layer: measured on an emitted model, and predicted before emitting.

A tensor's payload is ceil(elements * storage bits / 8) bytes: int4 codes two per byte, int2
four per byte, float32 scales and int32 biases four bytes each. Protobuf framing (names, dims,
field tags: tens of bytes per tensor) is not counted, so the payloads of all initializers sum
to a little less than the file size.

A quantized layer's bytes are its weight codes, scales and zero points, and its int32 bias
with the bias scales (s_x * s_w, one per weight scale), or for a MatMulNBits layer its packed
blocks and repeated scales:

    DQ containers:  ceil(E * b / 8) + 4 C + ceil(C * b / 8)  [+ 8 R for int2's Reshape shape]
                    [+ 4 B + 4 C with a bias]
    MatMulNBits:    N * ceil(K / bs) * (bs * b / 8 + 4)  [+ N * ceil(ceil(K / bs) * b / 8)
                    asymmetric]
    GatherBlockQuantized (V, D) table:  V D b / 8 + 4 V D / bs  [+ V D b / (8 bs) unsigned]

    Group-wise (g weights per scale, G = rows * ceil(L / g) groups over the grouped view):
    DQ containers:  ceil(E * b / 8) + 4 G [+ ceil(G * b / 8) asymmetric] [+ 8 R for a
                    Conv's or int2's Reshape shape] [+ 4 B + 4 C with a bias]
    MatMulNBits:    G * (g * b / 8 + 4) [+ N * ceil(ceil(K / g) * b / 8) asymmetric]
    GatherBlockQuantized: as the DQ container (int4), without bias

with E weight elements, C scale channels (1 per tensor), R the weight's rank, b the container
bits (8, 4 or 2; MatMulNBits: 4 for 3-4 bit codes, 2 for 2-bit codes; GatherBlockQuantized: 4
up to 4 bits, else 8), B bias elements and bs the block size. Zero points of MatMulNBits are
written only for asymmetric weights; the DQ containers of per-channel weights always have them.
`predict_layer_bytes` computes this from a `LayerGeometry` (read off the prepared model);
`layer_bytes` measures the emitted model. The allocator uses the prediction for `max_size_mb`
budgets; the two agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from onnxq.index import ModelIndex
from onnxq.numerics import IntRange, group_count, grouped_shape
from onnxq.passes.insert_qdq import (
    EmitOptions,
    Storage,
    gather_block_size,
    nbits_block_size,
    weight_storage,
)
from onnxq.plan import QuantPlan, WeightQuant

# Key of the activation scales and zero points (shared by the Q/DQ pairs of a group).
ACTIVATION_QPARAMS = "(activation qparams)"


def tensor_bytes(value: ir.Value) -> int:
    """Payload bytes of an initializer as serialized (sub-byte types packed)."""
    tensor = value.const_value
    if tensor is None:
        return 0
    return math.ceil(math.prod(tensor.shape.numpy()) * tensor.dtype.bitwidth / 8)


def _as_ir(model: ir.Model | onnx.ModelProto) -> ir.Model:
    return ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model


def _weight_initializers(node: ir.Node) -> list[ir.Value]:
    """Initializers a node reads directly or through a DequantizeLinear of a constant."""
    found = []
    for value in node.inputs:
        if value is None:
            continue
        if value.is_initializer():
            found.append(value)
            continue
        producer = value.producer()
        if producer is not None and producer.op_type == "Reshape" and producer.inputs[0] is not None:
            found.extend(v for v in producer.inputs[1:] if v is not None and v.is_initializer())
            producer = producer.inputs[0].producer()  # a Conv's grouped DQ, reshaped back to 4-D
        if (producer is not None and producer.op_type == "DequantizeLinear"
                and producer.inputs[0] is not None and producer.inputs[0].is_initializer()):
            found.extend(v for v in producer.inputs if v is not None and v.is_initializer())
    return found


def layer_bytes(model: ir.Model | onnx.ModelProto, plan: QuantPlan) -> dict[str, int]:
    """{node name: payload bytes} of an emitted model, every initializer counted once.

    Quantized layers (the plan's weight nodes) hold their codes, scales, zero points and bias;
    a float node holds the float initializers it reads (LayerNorm gains, excluded layers, ...);
    an initializer read by several nodes goes to the first in graph order. The activations'
    scales and zero points are under `ACTIVATION_QPARAMS`. The values sum to all initializer
    payloads.
    """
    model = _as_ir(model)
    graph = model.graph
    quantized = {spec.node for spec in plan.weights}
    counted: set[int] = set()
    result: dict[str, int] = {}
    # Quantized layers first, so that their codes / scales are theirs even if shared.
    ordered = sorted(graph, key=lambda node: node.name not in quantized)
    for node in ordered:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain == "":
            continue  # reached through their consumers; what is left is activation qparams
        total = 0
        values = (_weight_initializers(node) if node.name in quantized
                  else [v for v in node.inputs if v is not None and v.is_initializer()])
        for value in values:
            if id(value) not in counted:
                counted.add(id(value))
                total += tensor_bytes(value)
        if total or node.name in quantized:
            result[node.name] = result.get(node.name, 0) + total
    rest = sum(tensor_bytes(v) for v in graph.initializers.values() if id(v) not in counted)
    if rest:
        result[ACTIVATION_QPARAMS] = rest
    return result


@dataclass(frozen=True)
class LayerGeometry:
    """What a layer's size depends on: its op, weight shape, channel axis and bias length."""

    op_type: str
    weight_shape: tuple[int, ...]
    axis: int | None
    bias_elements: int = 0
    signed: bool = True
    group_sizes: tuple[int, int] = (0, 0)  # below 8 bits, at 8 bits (WeightQuant)
    asymmetric: bool = False  # zero points below 8 bits (written only then, group-wise)
    name_length: int = 0  # of the weight tensor's name (the emitter's names derive from it)

    def group_size(self, bits: int) -> int:
        return self.group_sizes[0] if bits < 8 else self.group_sizes[1]

    @property
    def elements(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def channels(self) -> int:
        return 1 if self.axis is None else self.weight_shape[self.axis]


def layer_geometry(index: ModelIndex, plan: QuantPlan, spec: WeightQuant) -> LayerGeometry:
    """The geometry of one planned weight, read from the prepared (float) model."""
    initializers = index.model.graph.initializers
    weight = initializers[spec.tensor].const_value
    bias_elements = 0
    for bias in plan.biases:
        if bias.node == spec.node:
            bias_elements = math.prod(initializers[bias.tensor].const_value.shape)
    group_sizes = (spec.low_bit_group_size, spec.int8_group_size) if spec.block_axis is not None \
        and spec.axis is not None else (0, 0)
    return LayerGeometry(index.node(spec.node).op_type, tuple(weight.shape.numpy()), spec.axis,
                         bias_elements, spec.grid.signed, group_sizes, spec.asymmetric,
                         len(spec.tensor.encode()))


def layer_storage(geometry: LayerGeometry, bits: int, options: EmitOptions | None = None) -> Storage:
    """The container the emitter writes a layer's codes in at `bits`."""
    return weight_storage(geometry.op_type, geometry.weight_shape, geometry.axis,
                          IntRange(bits, geometry.signed), options or EmitOptions(),
                          geometry.group_size(bits))


def stored_bits(geometry: LayerGeometry, bits: int, options: EmitOptions | None = None) -> int:
    """Bits each code of a layer at `bits` takes in its container (3-bit codes: 4, in int4)."""
    return layer_storage(geometry, bits, options).bits


def predict_layer_bytes(geometry: LayerGeometry, bits: int,
                        options: EmitOptions | None = None) -> int:
    """Payload bytes the emitter will write for a layer at `bits`."""
    options = options or EmitOptions()
    group = geometry.group_size(bits)
    storage = layer_storage(geometry, bits, options)
    asymmetric = geometry.asymmetric and bits < 8
    if group:
        return _predict_grouped_bytes(geometry, storage, group, asymmetric)
    if storage.matmul_nbits:
        k, n = geometry.weight_shape
        block = nbits_block_size(k, options, storage.bits)
        return _nbits_bytes(k, n, block, storage.bits, asymmetric)
    if storage in (Storage.GATHER_BLOCKS, Storage.GATHER_BLOCKS_8):
        rows, row = geometry.weight_shape
        scales = rows * (row // gather_block_size(row))
        zero_points = 0 if geometry.signed else math.ceil(scales * storage.bits / 8)
        return math.ceil(rows * row * storage.bits / 8) + 4 * scales + zero_points
    channels = geometry.channels
    total = (math.ceil(geometry.elements * storage.bits / 8) + 4 * channels
             + math.ceil(channels * storage.bits / 8))
    total += 8 * len(geometry.weight_shape) if storage is Storage.INT2 else 0
    if geometry.bias_elements:
        total += 4 * geometry.bias_elements + 4 * channels
    return total


def _nbits_bytes(k: int, n: int, block: int, bits: int, asymmetric: bool) -> int:
    """MatMulNBits of a (K, N) weight: packed blocks and a float32 scale per block, zero points
    packed 8 / bits per byte (each row padded to whole bytes) where asymmetric."""
    blocks = math.ceil(k / block)
    zero_points = n * math.ceil(blocks * bits / 8) if asymmetric else 0
    return n * blocks * (block * bits // 8 + 4) + zero_points


def _predict_grouped_bytes(geometry: LayerGeometry, storage: Storage, group: int,
                           asymmetric: bool) -> int:
    """Group-wise layouts: codes, one float32 scale per group, zero points (container bits)
    only when asymmetric; the shape for the Reshape behind the DQ of a Conv or of int2 codes;
    the bias."""
    rows, length = grouped_shape(geometry.weight_shape)
    view = (rows, length)
    # The reduction axis of the view, as onnxq.passes.op_table.reduction_axis gives it.
    block_axis = {"MatMul": 0, "Gemm": 1 - (geometry.axis or 0)}.get(geometry.op_type, 1)
    groups = group_count(view[block_axis], group) * view[1 - block_axis]
    if storage.matmul_nbits:
        return _nbits_bytes(view[0], view[1], group, storage.bits, asymmetric)
    total = math.ceil(geometry.elements * storage.bits / 8) + 4 * groups
    total += math.ceil(groups * storage.bits / 8) if asymmetric else 0
    reshaped = len(geometry.weight_shape) > 2 or storage is Storage.INT2
    total += 8 * len(geometry.weight_shape) if reshaped else 0
    if geometry.bias_elements:
        total += 4 * geometry.bias_elements + 4 * geometry.channels
    return total


def framing_bytes(geometry: LayerGeometry, bits: int, options: EmitOptions | None = None) -> int:
    """An upper bound of the protobuf framing a layout adds to the file beyond the per-channel
    DQ container's (payloads are `predict_layer_bytes`'): a group-wise DQ's block_size
    attribute, and the Reshape node and its shape tensor behind the DQ of a group-wise Conv or
    of int2 codes, whose names repeat the weight's name about 7 times. Size budgets add it, so
    that the written file keeps within them."""
    group = geometry.group_size(bits)
    storage = weight_storage(geometry.op_type, geometry.weight_shape, geometry.axis,
                             IntRange(bits, geometry.signed), options or EmitOptions(), group)
    extra = 16 if group else 0
    if (group and len(geometry.weight_shape) > 2) or storage is Storage.INT2:
        extra += 7 * (geometry.name_length + 6) + 48
    return extra


def predicted_layer_bytes(model: ir.Model, plan: QuantPlan,
                          options: EmitOptions | None = None) -> dict[str, int]:
    """`predict_layer_bytes` for every planned weight at its planned bits."""
    index = ModelIndex(model)
    return {spec.node: predict_layer_bytes(layer_geometry(index, plan, spec), spec.grid.bits,
                                           options)
            for spec in plan.weights}


def unquantized_bytes(model: ir.Model, plan: QuantPlan) -> int:
    """Payload bytes that no layer's bit-width changes, predicted from the prepared model: the
    initializers the plan leaves float, plus each activation group's scale (float32) and zero
    point (one byte). Equals the measured `layer_bytes` of every non-quantized key together
    (protobuf framing of the file is not included), except that a group read only by
    MatMulNBits layers that drop their activation Q/DQ loses its 5 bytes."""
    replaced = {spec.tensor for spec in plan.weights} | {spec.tensor for spec in plan.biases}
    still_read = {value.name for node in model.graph for value in node.inputs
                  if value is not None and value.is_initializer()
                  and not any(spec.node == node.name and spec.tensor == value.name
                              for spec in [*plan.weights, *plan.biases])}
    kept = sum(tensor_bytes(value) for name, value in model.graph.initializers.items()
               if name not in replaced or name in still_read)
    return kept + sum(4 + math.ceil(group.grid.bits / 8) for group in plan.activation_groups)
