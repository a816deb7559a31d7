"""Fuse HardSwish written out as elementwise ops into one HardSwish node (opset 14).

    Mul(x, Clip(Add(x, 3), 0, 6)) -> Div(., 6) or Mul(., 1/6)      (either Mul operand order)
    Mul(x, HardSigmoid(x, alpha = 1/6, beta = 0.5))
      = HardSwish(x) = x * max(0, min(1, x / 6 + 0.5))

Exact up to float rounding. Why: exporters that predate the op (Paddle's p2o, older TF
converters) write it out; a quantized model then runs four float ops per activation between a
DequantizeLinear and a QuantizeLinear (PP-OCRv4: 28 of them, about 6 ms of a 41 ms run at one
thread), where ORT has one float HardSwish kernel. The intermediate values may not be read by
anything else. The model is raised to opset 14 first when it is older and a pattern is found.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxq.passes.upgrade_opset import UpgradeOpsetPass

logger = logging.getLogger(__name__)

HARDSWISH_OPSET = 14


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(-1)[0])


def _default_domain(node: ir.Node | None) -> bool:
    return node is not None and node.domain in ("", "ai.onnx")


def _private(value: ir.Value) -> bool:
    """Read by one node and not a graph output: safe to fold away."""
    return len(list(value.uses())) == 1 and not value.is_graph_output()


def _other_operand(node: ir.Node, value: ir.Value) -> ir.Value | None:
    first, second = node.inputs
    return second if first is value else first if second is value else None


def _clip_bounds(clip: ir.Node) -> tuple[float | None, float | None]:
    if "min" in clip.attributes or "max" in clip.attributes:  # opset < 11
        low = clip.attributes["min"].as_float() if "min" in clip.attributes else None
        high = clip.attributes["max"].as_float() if "max" in clip.attributes else None
        return low, high
    inputs = list(clip.inputs) + [None, None]
    return _scalar(inputs[1]), _scalar(inputs[2])


def _gate_input(gate: ir.Node) -> ir.Value | None:
    """x when `gate` computes Clip(x + 3, 0, 6) (the HardSwish numerator's gate, times 6) or
    HardSigmoid(x, 1/6, 0.5); None otherwise."""
    if gate.op_type == "HardSigmoid":
        alpha = gate.attributes["alpha"].as_float() if "alpha" in gate.attributes else 0.2
        beta = gate.attributes["beta"].as_float() if "beta" in gate.attributes else 0.5
        return gate.inputs[0] if np.isclose(alpha, 1 / 6) and np.isclose(beta, 0.5) else None
    if gate.op_type != "Clip" or _clip_bounds(gate) != (0.0, 6.0):
        return None
    add = gate.inputs[0].producer()
    if not _default_domain(add) or add.op_type != "Add" or not _private(add.outputs[0]):
        return None
    for index in (0, 1):
        if _scalar(add.inputs[1 - index]) == 3.0 and add.inputs[index].const_value is None:
            return add.inputs[index]
    return None


def match(mul: ir.Node) -> tuple[ir.Value, ir.Node, list[ir.Node]] | None:
    """For the Mul of a written-out HardSwish: its input x, the node whose output becomes
    HardSwish(x), and the nodes that go."""
    if not _default_domain(mul) or mul.op_type != "Mul" or len(mul.inputs) != 2:
        return None
    for gate_value in mul.inputs:
        gate = gate_value.producer() if gate_value is not None else None
        if not _default_domain(gate) or not _private(gate_value):
            continue
        x = _gate_input(gate)
        if x is None or _other_operand(mul, gate_value) is not x:
            continue
        if gate.op_type == "HardSigmoid":
            return x, mul, [mul, gate]
        scale = _sixth(mul)
        if scale is None:
            return None
        return x, scale, [scale, mul, gate, gate.inputs[0].producer()]
    return None


def _sixth(mul: ir.Node) -> ir.Node | None:
    """The Div by 6 (or Mul by 1/6) that reads the Mul alone."""
    if not _private(mul.outputs[0]):
        return None
    node = next(iter(mul.outputs[0].uses())).node
    if not _default_domain(node) or (node.op_type == "Div" and node.inputs[0] is not mul.outputs[0]):
        return None
    constant = _scalar(_other_operand(node, mul.outputs[0])) if node.op_type in ("Div", "Mul") else None
    if constant is None or not np.isclose(constant, 6.0 if node.op_type == "Div" else 1 / 6):
        return None
    return node


class FuseHardSwishPass(ir.passes.FunctionalPass):
    """Each written-out HardSwish becomes one HardSwish node."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not any(match(node) for node in model.graph):
            return ir.passes.PassResult(model.clone(), modified=False)  # tensors are shared, not copied
        model = UpgradeOpsetPass(HARDSWISH_OPSET)(model).model
        graph = model.graph
        fused = 0
        for node in list(graph):
            found = match(node) if node.graph is graph else None
            if found is None:
                continue
            x, last, gone = found
            hardswish = ir.Node("", "HardSwish", [x], name=f"{last.name}_hardswish")
            graph.insert_after(last, hardswish)
            last.outputs[0].replace_all_uses_with(hardswish.outputs[0], replace_graph_outputs=True)
            name = last.outputs[0].name
            last.outputs[0].name = None
            hardswish.outputs[0].name = name
            graph.remove(gone, safe=True)
            fused += 1
        logger.info("fused %d written-out HardSwish activations", fused)
        return ir.passes.PassResult(model, modified=fused > 0)
