"""The search graph: activation scales and weight-scale multipliers as graph inputs, and the
part of the graph a candidate runs.

    x -> Q(x, s_g, z) -> DQ(., s_g, z) -> ...      becomes      s_g a graph input (one per group,
                                                                 read by all its Q and DQ nodes)
    DQ(codes, s_w, z_w) -> Conv                    becomes      DQ(codes, s_w * m_w, z_w), m_w a
                                                                 scalar graph input (1 at first)

    MatMulNBits(x, B, s_w) -> y                    becomes      MatMulNBits(x, B, s_w) * m_w

A weight keeps its integer codes: m_w rescales all its scales at once (per channel or per group),
so what a weight searcher (COMQ, round to nearest, any bits) chose stays, and only the layer's
gain moves. A DequantizeLinear's scale is multiplied in the graph, so a candidate scores exactly
the model the emitter writes with scales s_w m_w. A MatMulNBits or GatherBlockQuantized output is
multiplied instead (the same up to float rounding): ORT's MatMulNBits with int8 compute gives
wrong results when its `scales` input is not a constant.

A bias read by a layer whose input scale is lifted is int32 with scale s_x * s_w, so the emitter
re-rounds it whenever s_x moves; the search graph computes that rounding from the lifted input,

    b_hat = clip(round(b / max(s_x s_w, MIN_SCALE))) * max(s_x s_w, MIN_SCALE)

(the codes in double, as the emitter computes them: float32 cannot hold every integer past 2^24,
and PP-OCRv4's biases reach 2^27 codes)

with the float bias b as a constant, so a candidate scores the model the emitter writes for it
(the loss is jagged enough that a fixed bias, off by a fraction of a code, misleads the search).

One ORT session then scores any scales without serializing the model again. A block's
candidates run the *suffix* from the block's input tensor t:

    [cached t] -> block -> ... -> outputs          (global loss)
    [cached t] -> block -> next cut                (local loss)

built by feeding t as a graph input (every use of t rewired to it by identity) and dropping
what no longer feeds the outputs; graph inputs still read (an attention mask, the image for a
late Shape) stay inputs and are fed from the original feeds. The rewiring is on copies: the
emitted model is left as it is.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq import model_io, numerics
from onnxq.plan import BiasQuant, QuantPlan, WeightQuant

BLOCK_INPUT = "onnxq_block_input"


@dataclass(frozen=True)
class LiftedScales:
    """A copy of a QDQ model whose activation scales are graph inputs: `inputs` maps each
    group (by stats tensor) to its input name, `defaults` to its emitted scale."""

    model: ir.Model
    inputs: dict[str, str]
    defaults: dict[str, np.ndarray]
    weights: dict[str, WeightQuant] = field(default_factory=dict)  # weight key -> its spec


WEIGHT_KEY = "onnxq_weight:"  # prefix of a weight multiplier's key (the weight tensor follows)
WEIGHT_SCALE_READERS = ("MatMulNBits", "GatherBlockQuantized")  # scaled on their output


def weight_key(tensor: str) -> str:
    """The key of a weight's multiplier among the searched scales."""
    return f"{WEIGHT_KEY}{tensor}"


@dataclass(frozen=True)
class BiasSource:
    """What the emitter rounds a bias from: the float bias and its layer's weight scales."""

    bias: np.ndarray
    weight_scale: np.ndarray


def lift_scales(quantized: ir.Model, plan: QuantPlan, biases: Mapping[BiasQuant, BiasSource] | None = None,
                weights: Collection[WeightQuant] = ()) -> LiftedScales:
    """Lift the scale of every activation group that has a QuantizeLinear in `quantized` (a
    group read only by MatMulNBits layers has none) and a multiplier of each weight in `weights`
    whose scale a DequantizeLinear, MatMulNBits or GatherBlockQuantized reads; the biases in
    `biases` whose input scale or weight is lifted are rounded from them in the graph."""
    model = _copy(quantized)
    quantize_of = {node.inputs[0].name: node for node in model.graph
                   if node.op_type == "QuantizeLinear" and node.inputs[0] is not None}
    inputs, defaults = {}, {}
    for number, group in enumerate(plan.activation_groups):
        node = next((quantize_of[t] for t in group.tensors if t in quantize_of), None)
        if node is None or node.inputs[1] is None or node.inputs[1].const_value is None:
            continue
        scale = node.inputs[1]
        name = f"onnxq_scale{number}"
        array = scale.const_value.numpy().astype(np.float32)
        lifted = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
        model.graph.inputs.append(lifted)
        scale.replace_all_uses_with(lifted)
        if scale.is_initializer():
            model.graph.initializers.pop(scale.name)
        inputs[group.stats_tensor], defaults[group.stats_tensor] = name, array
    nodes = {node.name: node for node in model.graph}
    int32_biases = {spec.weight: spec for spec in (biases or {})
                    if _bias_dequantized(nodes.get(spec.node), spec.input_index)}
    lifted_weights = {}
    for number, spec in enumerate(weights):
        bias = int32_biases.get(spec.tensor)
        if bias is not None and plan.group_of(bias.activation).stats_tensor not in inputs:
            continue  # its int32 bias would need the input scale as a constant: left out
        if _lift_weight_scale(model.graph, nodes.get(spec.node), spec, f"onnxq_weight_scale{number}"):
            key = weight_key(spec.tensor)
            inputs[key], defaults[key] = f"onnxq_weight_scale{number}", np.ones((), np.float32)
            lifted_weights[key] = spec
    values = _values_by_name(model.graph)
    for spec, source in (biases or {}).items():
        group = plan.group_of(spec.activation)
        multiplier = inputs.get(weight_key(spec.weight))
        if spec.weight in int32_biases and (group.stats_tensor in inputs or multiplier is not None):
            _round_bias_in_graph(model.graph, nodes[spec.node], spec.input_index,
                                 values[inputs[group.stats_tensor]], source,
                                 values[multiplier] if multiplier is not None else None)
    RemoveUnusedNodesPass()(model)
    return LiftedScales(model, inputs, defaults, lifted_weights)


def _bias_dequantized(node: ir.Node | None, index: int) -> bool:
    """Whether `node`'s input `index` is an emitted int32 bias (a DequantizeLinear's output)."""
    current = node.inputs[index] if node is not None and len(node.inputs) > index else None
    return current is not None and current.producer() is not None \
        and current.producer().op_type == "DequantizeLinear"


def _lift_weight_scale(graph: ir.Graph, node: ir.Node | None, spec: WeightQuant, name: str) -> bool:
    """Multiply what `spec`'s codes are read with by a new scalar graph input `name`: the
    constant scale of its DequantizeLinear, or the output of a MatMulNBits / GatherBlockQuantized
    (linear in its scales; ORT 1.32's MatMulNBits at accuracy level 4 computes wrong results when
    its `scales` input is not a constant). False where there is nothing to scale (a dynamic
    layer's weight, a MatMulNBits with its bias inside)."""
    if node is None:
        return False
    multiplier = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    if node.op_type in WEIGHT_SCALE_READERS:
        if len(node.inputs) > 5 and node.inputs[5] is not None:
            return False
        graph.inputs.append(multiplier)
        output = node.outputs[0]
        scaled = ir.Node("", "Mul", [output, multiplier], outputs=[ir.Value(name=f"{name}_scaled")],
                         name=f"{name}_mul")
        graph.insert_after(node, scaled)
        output.replace_all_uses_with(scaled.outputs[0])
        scaled.replace_input_with(0, output)
        if output in graph.outputs:
            graph.outputs[graph.outputs.index(output)] = scaled.outputs[0]
            scaled.outputs[0].name, output.name = output.name, f"{name}_unscaled"
        return True
    value = node.inputs[spec.input_index] if len(node.inputs) > spec.input_index else None
    while value is not None and value.producer() is not None \
            and value.producer().op_type in ("Reshape", "Transpose"):
        value = value.producer().inputs[0]
    reader = value.producer() if value is not None else None
    scale = reader.inputs[1] if reader is not None and reader.op_type == "DequantizeLinear" else None
    if scale is None or scale.const_value is None:
        return False
    graph.inputs.append(multiplier)
    scaled = ir.Node("", "Mul", [scale, multiplier], outputs=[ir.Value(name=f"{name}_scaled")],
                     name=f"{name}_mul")
    graph.insert_before(reader, scaled)
    reader.replace_input_with(1, scaled.outputs[0])
    return True


def _round_bias_in_graph(graph: ir.Graph, node: ir.Node, index: int, input_scale: ir.Value,
                         source: BiasSource, weight_multiplier: ir.Value | None = None) -> None:
    """node's bias input <- the emitter's int32 rounding of `source` at scale input_scale s_w
    (s_w times the weight's lifted multiplier, when it has one)."""
    def constant(suffix: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=f"{node.name}_bias_{suffix}", const_value=ir.tensor(array))
        graph.register_initializer(value)
        return value

    def op(op_type: str, *operands: ir.Value, **attributes: int) -> ir.Value:
        created = ir.Node("", op_type, list(operands),
                          attributes=[ir.AttrInt64(key, value) for key, value in attributes.items()],
                          name=f"{node.name}_bias_{op_type.lower()}{len(made)}")
        made.append(created)
        graph.insert_before(node, created)
        return created.outputs[0]

    made: list[ir.Node] = []
    weight_scale = constant("ws", np.asarray(source.weight_scale, np.float32).reshape(-1))
    if weight_multiplier is not None:
        weight_scale = op("Mul", weight_scale, weight_multiplier)
    scale = op("Max", op("Mul", input_scale, weight_scale),
               constant("min", np.float32(numerics.MIN_SCALE)))
    # codes in double, as the emitter rounds them (past 2^24 float32 cannot hold every integer);
    # then to float32 as DequantizeLinear converts its int32 codes
    double = op("Cast", scale, to=ir.DataType.DOUBLE.value)
    codes = op("Round", op("Div", constant("b", source.bias.astype(np.float64)), double))
    clipped = op("Clip", codes, constant("lo", np.float64(numerics.INT32.qmin)),
                 constant("hi", np.float64(numerics.INT32.qmax)))
    node.replace_input_with(index, op("Mul", op("Cast", clipped, to=ir.DataType.FLOAT.value), scale))


def with_outputs(model: ir.Model, tensors: list[str]) -> ir.Model:
    """A copy of `model` that also returns the named tensors (block inputs to cache)."""
    copy = _copy(model)
    values = _values_by_name(copy.graph)
    present = {id(v) for v in copy.graph.outputs}
    for name in tensors:
        if id(values[name]) not in present:
            copy.graph.outputs.append(values[name])
    return copy


def suffix_model(model: ir.Model, start: str | None, end: str | None) -> ir.Model:
    """The part of `model` from tensor `start` (None: the graph inputs) to tensor `end` (None:
    the graph outputs), `start` fed as the input `BLOCK_INPUT`."""
    copy = _copy(model)
    graph = copy.graph
    values = _values_by_name(graph)
    if end is not None:
        graph.outputs.clear()
        graph.outputs.append(values[end])
    if start is not None:
        source = values[start]
        # a value made by a pass after shape inference (e.g. SmoothQuant's Mul) has no type
        # yet: activations are float
        fed = ir.Value(name=BLOCK_INPUT, shape=source.shape,
                       type=source.type or ir.TensorType(ir.DataType.FLOAT))
        graph.inputs.append(fed)
        source.replace_all_uses_with(fed)
    RemoveUnusedNodesPass()(copy)
    for value in [v for v in graph.inputs if not v.uses() and v.name != BLOCK_INPUT]:
        graph.inputs.remove(value)
    return copy


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update({v.name: v for node in graph for v in node.outputs})
    return values


def _copy(model: ir.Model) -> ir.Model:
    return model_io.to_ir(model_io.to_proto(model))
