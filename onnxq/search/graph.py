"""The search graph: activation scales as graph inputs, and the part of the graph a candidate
runs.

    x -> Q(x, s_g, z) -> DQ(., s_g, z) -> ...      becomes      s_g a graph input (one per group,
                                                                 read by all its Q and DQ nodes)

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

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq import model_io
from onnxq.plan import QuantPlan

BLOCK_INPUT = "onnxq_block_input"


@dataclass(frozen=True)
class LiftedScales:
    """A copy of a QDQ model whose activation scales are graph inputs: `inputs` maps each
    group (by stats tensor) to its input name, `defaults` to its emitted scale."""

    model: ir.Model
    inputs: dict[str, str]
    defaults: dict[str, np.ndarray]


def lift_activation_scales(quantized: ir.Model, plan: QuantPlan) -> LiftedScales:
    """Lift the scale of every activation group that has a QuantizeLinear in `quantized` (a
    group read only by MatMulNBits layers has none)."""
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
    return LiftedScales(model, inputs, defaults)


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
        fed = ir.Value(name=BLOCK_INPUT, shape=source.shape, type=source.type)
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
