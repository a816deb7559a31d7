"""Fold inference-mode BatchNormalization into the Conv or Gemm that feeds it.

    y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
      = conv(x, W * k) + (b - mean) * k + beta,        k = gamma / sqrt(var + eps)

k scales each output channel: axis 0 of a Conv weight, and of a Gemm's B with transB (axis 1
without). Applies only when the Conv/Gemm output feeds the BatchNormalization alone and every
parameter is a constant; the BatchNormalization's output value is kept (it may be a graph
output), produced by the rewritten Conv/Gemm.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxq.passes.op_table import gemm_weight_axis

logger = logging.getLogger(__name__)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Conv/Gemm -> BatchNormalization  becomes  Conv/Gemm with rescaled weight and bias."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = 0
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
                continue
            if len(bn.outputs) > 1 and any(o.uses() for o in bn.outputs[1:]):
                continue
            producer = bn.inputs[0].producer()
            if producer is None or producer.op_type not in ("Conv", "Gemm"):
                continue
            if len(bn.inputs[0].uses()) != 1 or bn.inputs[0].is_graph_output():
                continue
            params = [_constant(v) for v in bn.inputs[1:5]]
            weight = _constant(producer.inputs[1])
            if weight is None or any(p is None for p in params):
                continue
            if producer.op_type == "Gemm" and not self._plain_gemm(producer):
                continue
            self._fold(graph, producer, bn, weight, params)
            folded += 1
        if folded:
            logger.info("folded %d BatchNormalization nodes", folded)
        return ir.passes.PassResult(model, modified=folded > 0)

    @staticmethod
    def _plain_gemm(gemm: ir.Node) -> bool:
        """Gemm without transA and with alpha = beta = 1 (what exporters write for Linear)."""
        attrs = gemm.attributes
        return all((attrs.get(name) is None or attrs[name].value == default)
                   for name, default in (("transA", 0), ("alpha", 1.0), ("beta", 1.0)))

    @staticmethod
    def _fold(graph: ir.Graph, producer: ir.Node, bn: ir.Node, weight: np.ndarray,
              params: list[np.ndarray]) -> None:
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        k = gamma / np.sqrt(var + eps)
        axis = 0 if producer.op_type == "Conv" else gemm_weight_axis(producer)
        shape = [1] * weight.ndim
        shape[axis] = -1
        new_weight = (weight.astype(np.float64) * k.reshape(shape)).astype(weight.dtype)
        old_bias = _constant(producer.inputs[2]) if len(producer.inputs) > 2 else None
        bias = np.zeros_like(mean) if old_bias is None else old_bias.astype(np.float64)
        new_bias = ((bias - mean) * k + beta).astype(weight.dtype)

        weight_value = ir.Value(name=f"{producer.inputs[1].name}_bnfolded",
                                const_value=ir.tensor(new_weight))
        bias_value = ir.Value(name=f"{producer.name}_bias_bnfolded", const_value=ir.tensor(new_bias))
        graph.register_initializer(weight_value)
        graph.register_initializer(bias_value)
        producer.replace_input_with(1, weight_value)
        if len(producer.inputs) < 3:
            producer.resize_inputs(3)
        producer.replace_input_with(2, bias_value)
        # The Conv/Gemm now produces what the BN did, under the BN output's name.
        bn_output, conv_output = bn.outputs[0], producer.outputs[0]
        bn_output.replace_all_uses_with(conv_output, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        name = bn_output.name
        bn_output.name = None
        conv_output.name = name
