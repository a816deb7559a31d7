"""Insert QuantizeLinear / DequantizeLinear nodes as the plan and parameters say.

For every activation tensor t of a quantized group (one scale/zero point per group):

    producer -> t -> consumers        becomes        producer -> t -> Q -> DQ -> consumers

For every quantized weight W of node n (codes and scales given, never re-rounded here):

    W (float initializer) -> n        becomes        W_q (int8, or int4 below 5 bits) -> DQ(axis) -> n

and a bias b becomes an int32 initializer with scale s_x * s_w and zero point 0 behind a DQ.
ORT then fuses DQ -> Conv -> Q into QLinearConv, DQ -> MatMul into MatMulIntegerToFloat, and
drops Q/DQ pairs around chain ops whose input and output share parameters. A tensor that is a
graph output keeps feeding the output in float.
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxq import numerics
from onnxq.numerics import IntRange
from onnxq.plan import QuantPlan
from onnxq.qparams import QParams

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


def storage_dtype(grid: IntRange) -> np.dtype:
    """Codes of 2 to 4 bits are stored as int4 / uint4 (packed two per byte, opset 21); 5 to 8
    bits as int8 / uint8."""
    if grid.bits <= 4:
        return np.dtype(ml_dtypes.int4 if grid.signed else ml_dtypes.uint4)
    return grid.dtype


def _unique_stem(graph: ir.Graph, stem: str) -> str:
    """`stem`, or `stem_N` when a weight used by several nodes was already quantized."""
    candidate, count = stem, 1
    while f"{candidate}_q" in graph.initializers:
        candidate, count = f"{stem}_{count}", count + 1
    return candidate


class InsertQDQPass(ir.passes.InPlacePass):
    """Rewrite a prepared model with the Q/DQ nodes of `plan` and `qparams`."""

    def __init__(self, plan: QuantPlan, qparams: QParams) -> None:
        super().__init__()
        self.plan = plan
        self.qparams = qparams

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
            storage = storage_dtype(spec.grid)
            codes = _initializer(graph, f"{stem}_q", params.codes.astype(storage))
            scale = _initializer(graph, f"{stem}_s", params.scale.astype(np.float32))
            zero_point = _initializer(graph, f"{stem}_zp", params.zero_point.astype(storage))
            dequantized = self._dequantize(graph, node, [codes, scale, zero_point], spec.axis,
                                           f"{stem}_dq")
            node.replace_input_with(spec.input_index, dequantized)
            weight_scales[spec.node] = params.scale
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

    @staticmethod
    def _insert_pair(graph: ir.Graph, value: ir.Value, scale: ir.Value,
                     zero_point: ir.Value) -> None:
        dequantized = ir.Value(name=f"{value.name}_dq", shape=value.shape, type=value.type)
        value.replace_all_uses_with(dequantized)
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
