"""Run a Pad that did not fold (passes/fold_pad.py) on integer codes instead of floats.

A Pad is a chain op (passes/op_table.py): its output shares its input's scale and zero point,
so the Q/DQ pass leaves

    c -> DQ(s, z) -> Pad(v) -> Q(s, z) -> DQ(s, z) -> ...

ONNX Runtime 1.32 has no QDQ selector for Pad (it drops Q/DQ pairs only around Reshape,
Transpose, Gather, Slice, ... and MaxPool), so that Pad runs in float between a DequantizeLinear
and a QuantizeLinear: a float island. Its CPU Pad kernel takes uint8 and int8, so the pass moves
the Pad onto the codes:

    c -> Pad(Q(v)) -> DQ(s, z) -> ...

which is exact for every mode: Q(DQ(c)) = c, and constant mode pads with Q(v) either way (a
zero pad value becomes the zero point). It applies when the Pad's data input is the output of a
DequantizeLinear with a per-tensor scale, and its output feeds exactly one QuantizeLinear with
the same scale and zero point (the same initializers, as a shared group has) and nothing else.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)


def _same_params(first: ir.Node, second: ir.Node) -> bool:
    """Whether two Q/DQ nodes read the very same scale and zero point, per tensor."""
    if len(first.inputs) < 3 or len(second.inputs) < 3:
        return False
    scale = first.inputs[1]
    return (scale is second.inputs[1] and first.inputs[2] is second.inputs[2]
            and scale is not None and scale.const_value is not None
            and scale.const_value.numpy().size == 1)


def _codes_pad(pad: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    """(DQ in front, Q behind) when the Pad can run on codes, else None."""
    if pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx"):
        return None
    dequantize = pad.inputs[0].producer() if pad.inputs[0] is not None else None
    output = pad.outputs[0]
    uses = list(output.uses())
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.domain != "":
        return None
    if len(uses) != 1 or output.is_graph_output() or uses[0].node.op_type != "QuantizeLinear":
        return None
    value = pad.inputs[2] if len(pad.inputs) > 2 else None
    if value is not None and value.const_value is None:
        return None  # a pad value computed at run time
    quantize = uses[0].node
    return (dequantize, quantize) if _same_params(dequantize, quantize) else None


class IntegerPadPass(ir.passes.InPlacePass):
    """DQ -> Pad -> Q (shared parameters)  becomes  Pad on the codes (module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        moved = 0
        for pad in list(graph):
            pair = _codes_pad(pad)
            if pair is None:
                continue
            self._move(graph, pad, *pair)
            moved += 1
        if moved:
            logger.info("%d Pad nodes run on integer codes", moved)
        return ir.passes.PassResult(model, modified=moved > 0)

    @staticmethod
    def _move(graph: ir.Graph, pad: ir.Node, dequantize: ir.Node, quantize: ir.Node) -> None:
        scale = float(dequantize.inputs[1].const_value.numpy().reshape(()))
        zero_point = dequantize.inputs[2].const_value.numpy()
        if len(pad.inputs) > 2 and pad.inputs[2] is not None:
            value = float(pad.inputs[2].const_value.numpy().reshape(()))
            info = np.iinfo(zero_point.dtype)
            code = np.clip(np.round(value / scale) + zero_point.astype(np.int64), info.min, info.max)
            code_value = ir.Value(name=f"{pad.name}_value_q",
                                  const_value=ir.tensor(np.asarray(code, zero_point.dtype)))
            graph.register_initializer(code_value)
            pad.replace_input_with(2, code_value)
        elif zero_point.reshape(-1)[0] != 0:
            pad.resize_inputs(3)
            code_value = ir.Value(name=f"{pad.name}_value_q", const_value=ir.tensor(zero_point.reshape(())))
            graph.register_initializer(code_value)
            pad.replace_input_with(2, code_value)
        pad.replace_input_with(0, dequantize.inputs[0])
        codes = quantize.outputs[0]
        padded = pad.outputs[0]
        # a new type object: the float type is shared with values that stay float
        padded.type = ir.TensorType(ir.DataType.from_numpy(zero_point.dtype))
        codes.replace_all_uses_with(padded)
        graph.remove(quantize, safe=True)
        if not dequantize.outputs[0].uses():
            graph.remove(dequantize, safe=True)
