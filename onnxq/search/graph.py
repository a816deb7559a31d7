"""The search graph: activation scales as graph inputs, and the part of the graph a candidate
runs.

    x -> Q(x, s_g, z) -> DQ(., s_g, z) -> ...      becomes      s_g a graph input (one per group,
                                                                 read by all its Q and DQ nodes)

A bias read by a layer whose input scale is lifted is int32 with scale s_x * s_w, so the emitter
re-rounds it whenever s_x moves; the search graph computes that rounding from the lifted input,

    b_hat = clip(round(b / max(s_x s_w, MIN_SCALE))) * max(s_x s_w, MIN_SCALE)

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

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq import model_io, numerics
from onnxq.plan import BiasQuant, QuantPlan

BLOCK_INPUT = "onnxq_block_input"


@dataclass(frozen=True)
class LiftedScales:
    """A copy of a QDQ model whose activation scales are graph inputs: `inputs` maps each
    group (by stats tensor) to its input name, `defaults` to its emitted scale."""

    model: ir.Model
    inputs: dict[str, str]
    defaults: dict[str, np.ndarray]


@dataclass(frozen=True)
class BiasSource:
    """What the emitter rounds a bias from: the float bias and its layer's weight scales."""

    bias: np.ndarray
    weight_scale: np.ndarray


def lift_activation_scales(quantized: ir.Model, plan: QuantPlan,
                           biases: Mapping[BiasQuant, BiasSource] | None = None) -> LiftedScales:
    """Lift the scale of every activation group that has a QuantizeLinear in `quantized` (a
    group read only by MatMulNBits layers has none); the biases in `biases` whose input scale
    is lifted are rounded from it in the graph."""
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
    values = _values_by_name(model.graph)
    nodes = {node.name: node for node in model.graph}
    for spec, source in (biases or {}).items():
        group = plan.group_of(spec.activation)
        node = nodes.get(spec.node)
        current = node.inputs[spec.input_index] if node is not None and len(node.inputs) > spec.input_index \
            else None
        emitted = current is not None and current.producer() is not None \
            and current.producer().op_type == "DequantizeLinear"
        if group.stats_tensor in inputs and emitted:
            _round_bias_in_graph(model.graph, node, spec.input_index,
                                 values[inputs[group.stats_tensor]], source)
    RemoveUnusedNodesPass()(model)
    return LiftedScales(model, inputs, defaults)


def _round_bias_in_graph(graph: ir.Graph, node: ir.Node, index: int, input_scale: ir.Value,
                         source: BiasSource) -> None:
    """node's bias input <- the emitter's int32 rounding of `source` at scale input_scale s_w."""
    def constant(suffix: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=f"{node.name}_bias_{suffix}", const_value=ir.tensor(array))
        graph.register_initializer(value)
        return value

    def op(op_type: str, *operands: ir.Value) -> ir.Value:
        created = ir.Node("", op_type, list(operands), name=f"{node.name}_bias_{op_type.lower()}{len(made)}")
        made.append(created)
        graph.insert_before(node, created)
        return created.outputs[0]

    made: list[ir.Node] = []
    weight_scale = np.asarray(source.weight_scale, np.float32).reshape(-1)
    scale = op("Max", op("Mul", input_scale, constant("ws", weight_scale)),
               constant("min", np.float32(numerics.MIN_SCALE)))
    codes = op("Round", op("Div", constant("b", source.bias.astype(np.float32)), scale))
    clipped = op("Clip", codes, constant("lo", np.float32(numerics.INT32.qmin)),
                 constant("hi", np.float32(numerics.INT32.qmax)))
    node.replace_input_with(index, op("Mul", clipped, scale))


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
