"""Fold a constant Pad into the pads of the Conv or pooling node that reads it.

    x -> Pad(pads p, constant v) -> Conv(pads c)        becomes        x -> Conv(pads c + p)

Exporters write TensorFlow-style "SAME" padding as a separate Pad in front of a Conv; ONNX
Runtime then runs that Pad in float between a DequantizeLinear and a QuantizeLinear (a float
island of the quantized model), where the Conv's own pads cost nothing. The fold is exact:

- Conv pads with zeros, so the Pad must be constant mode with value 0;
- AveragePool counts padded cells in its divisor only with count_include_pad = 1, so the fold
  sets it, which is exact when the pool had no pads of its own (or already counted them);
- MaxPool pads with -inf: a Pad of -inf folds; a Pad of v folds when every input is known to be
  >= v (the output of a Relu, or of a Clip whose min is >= v) and no window lies wholly in the
  padding (pad < kernel on every side), so that a padded cell never wins a window.

Every case also needs: pads only on spatial axes (not batch or channel), none negative (a
negative pad crops), the Pad's output read by that one node alone (and not a graph output), the
node's auto_pad unset, and no ceil_mode on pools (ceil_mode windows may start in the padding). A
Pad that does not fold stays as it is, and the reason is logged.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

FOLDABLE_OPS = ("Conv", "AveragePool", "MaxPool")


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _attribute(node: ir.Node, name: str, default):
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def pad_amounts(pad: ir.Node) -> tuple[np.ndarray, float] | str:
    """The Pad's (begin, end) amounts per axis as a (2, rank) array and its constant value, or
    why it cannot fold (not constant mode, pads not a constant, axes given, negative pads,
    padding on batch or channel axes)."""
    if pad.domain not in ("", "ai.onnx"):
        return "not an ONNX Pad"
    if _attribute(pad, "mode", "constant") not in ("constant", b"constant"):
        return f"mode {_attribute(pad, 'mode', '')!r}"
    pads = _constant(pad.inputs[1]) if len(pad.inputs) > 1 else None
    if pads is None:
        return "pads are not a constant"
    if len(pad.inputs) > 3 and pad.inputs[3] is not None:
        return "axes input given"
    constant = _constant(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] is not None else 0.0
    if constant is None:
        return "pad value is not a constant"
    amounts = np.asarray(pads, np.int64).reshape(2, -1)
    if amounts.min(initial=0) < 0:
        return "negative pads (a crop)"
    if amounts.shape[1] < 3 or amounts[:, :2].any():
        return "pads on batch or channel axes"
    return amounts, float(np.asarray(constant).reshape(()))


def _input_at_least(value: ir.Value, bound: float) -> bool:
    """Whether every element of `value` is known to be >= bound from its producer."""
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return False
    if producer.op_type == "Relu":
        return bound <= 0.0
    if producer.op_type == "Clip":
        low = _constant(producer.inputs[1]) if len(producer.inputs) > 1 else None
        if low is None and "min" in producer.attributes:
            low = producer.attributes["min"].as_float()
        return low is not None and float(np.asarray(low).reshape(())) >= bound
    return False


def fold_blocker(pad: ir.Node, consumer: ir.Node, amounts: np.ndarray, value: float) -> str | None:
    """Why this Pad cannot fold into `consumer`, or None when it can (module docstring)."""
    if consumer.op_type not in FOLDABLE_OPS or consumer.domain not in ("", "ai.onnx"):
        return f"read by {consumer.op_type}"
    if consumer.inputs[0] is not pad.outputs[0]:
        return "not the node's data input"
    if _attribute(consumer, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return "auto_pad set"
    if consumer.op_type != "Conv" and _attribute(consumer, "ceil_mode", 0):
        return "ceil_mode"
    spatial = amounts.shape[1] - 2
    own = np.asarray(_attribute(consumer, "pads", [0] * 2 * spatial), np.int64)
    if consumer.op_type == "Conv":
        return None if value == 0.0 else f"pad value {value} (Conv pads with 0)"
    if consumer.op_type == "AveragePool":
        if value != 0.0:
            return f"pad value {value} (AveragePool pads with 0)"
        if own.any() and not _attribute(consumer, "count_include_pad", 0):
            return "AveragePool has pads of its own that it does not count"
        return None
    if value == -np.inf:
        return None
    kernel = np.asarray(_attribute(consumer, "kernel_shape", []), np.int64)
    dilated = (kernel - 1) * np.asarray(_attribute(consumer, "dilations", [1] * spatial)) + 1
    if np.any(amounts[:, 2:] + own.reshape(2, -1) >= dilated):
        return "a MaxPool window could lie wholly in the padding"
    if not _input_at_least(pad.inputs[0], value):
        return f"pad value {value}: MaxPool input not known to be >= it"
    return None


class FoldPadPass(ir.passes.InPlacePass):
    """Pad -> Conv / AveragePool / MaxPool  becomes  the node with the Pad's amounts in its pads."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = 0
        for pad in list(graph):
            if pad.op_type != "Pad":
                continue
            reason = self._try_fold(graph, pad)
            if reason is None:
                folded += 1
            else:
                logger.debug("Pad %s not folded: %s", pad.name, reason)
        if folded:
            logger.info("folded %d Pad nodes into the pads of their consumers", folded)
        return ir.passes.PassResult(model, modified=folded > 0)

    @staticmethod
    def _try_fold(graph: ir.Graph, pad: ir.Node) -> str | None:
        """Fold `pad` into its one consumer; the reason it stays otherwise."""
        amounts = pad_amounts(pad)
        if isinstance(amounts, str):
            return amounts
        amounts, value = amounts
        output = pad.outputs[0]
        uses = list(output.uses())
        if len(uses) != 1 or output.is_graph_output():
            return "output read by more than one node (or a graph output)"
        consumer = uses[0].node
        reason = fold_blocker(pad, consumer, amounts, value)
        if reason is not None:
            return reason
        spatial = amounts.shape[1] - 2
        own = np.asarray(_attribute(consumer, "pads", [0] * 2 * spatial), np.int64).reshape(2, -1)
        consumer.attributes["pads"] = ir.AttrInt64s("pads", (own + amounts[:, 2:]).reshape(-1).tolist())
        if consumer.op_type == "AveragePool":
            consumer.attributes["count_include_pad"] = ir.AttrInt64("count_include_pad", 1)
        consumer.replace_input_with(0, pad.inputs[0])
        graph.remove(pad, safe=True)
        return None
