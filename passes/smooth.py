"""SmoothQuant: move activation outliers of MatMul inputs into the weights, exactly.

Transformer activations have a few channels far larger than the rest, so one per-tensor
activation scale wastes most of the int8 grid on them. For X (..., K) feeding MatMuls with
constant weights W (K, N), per input channel j

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        X W = (X / s) (diag(s) W)

X / s has flat channels and is easy to quantize per tensor; diag(s) W is quantized per output
channel as before. One Mul by 1/s is inserted on X, shared by every MatMul that reads X (the
other consumers, e.g. a residual Add, keep reading X); each W is replaced by diag(s) W, and
dropped from the graph when nothing else reads it.
In float the model computes the same function.

    X -> MatMul(W1), MatMul(W2), Add        becomes
    X -> Mul(1/s) -> MatMul(diag(s) W1), MatMul(diag(s) W2);   X -> Add
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)


def _weight_matmuls(value: ir.Value) -> list[ir.Node]:
    """MatMuls reading `value` as their first operand, with a constant 2-D second operand."""
    return [use.node for use in value.uses()
            if use.node.op_type == "MatMul" and use.idx == 0 and use.node.domain in ("", "ai.onnx")
            and use.node.inputs[1] is not None and use.node.inputs[1].const_value is not None
            and len(use.node.inputs[1].const_value.shape) == 2]


def smoothing_candidates(model: ir.Model, skip_nodes: frozenset[str] = frozenset()) -> list[str]:
    """Names of the activation tensors whose MatMul consumers SmoothQuant would rescale."""
    names = []
    for value in _activation_values(model.graph):
        if value.const_value is None and any(n.name not in skip_nodes for n in _weight_matmuls(value)):
            names.append(value.name)
    return names


def _activation_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


class SmoothMatMulInputsPass(ir.passes.InPlacePass):
    """Apply SmoothQuant to the tensors of `channel_absmax` (tensor name -> max|X_j| per j)."""

    def __init__(self, channel_absmax: dict[str, np.ndarray], alpha: float,
                 skip_nodes: frozenset[str] = frozenset()) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.channel_absmax = channel_absmax
        self.alpha = alpha
        self.skip_nodes = skip_nodes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        smoothed = 0
        for value in list(_activation_values(graph)):
            if value.name not in self.channel_absmax:
                continue
            matmuls = [n for n in _weight_matmuls(value) if n.name not in self.skip_nodes]
            if not matmuls:
                continue
            x_max = self.channel_absmax[value.name].astype(np.float64)
            weights = [n.inputs[1].const_value.numpy() for n in matmuls]
            if any(w.shape[0] != x_max.size for w in weights):
                continue
            w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
            scale = smoothing_scale(x_max, w_max, self.alpha)
            self._rewrite(graph, value, matmuls, weights, scale)
            smoothed += 1
        if smoothed:
            logger.info("smoothed the inputs of %d MatMul groups (alpha %.2f)", smoothed, self.alpha)
        return ir.passes.PassResult(model, modified=smoothed > 0)

    @staticmethod
    def _rewrite(graph: ir.Graph, value: ir.Value, matmuls: list[ir.Node],
                 weights: list[np.ndarray], scale: np.ndarray) -> None:
        inverse = ir.Value(name=f"{value.name}_smooth_inv",
                           const_value=ir.tensor((1.0 / scale).astype(np.float32)))
        graph.register_initializer(inverse)
        mul = ir.Node("", "Mul", [value, inverse], outputs=[ir.Value(name=f"{value.name}_smoothed")],
                      name=f"{value.name}_smooth")
        producer = value.producer()
        if producer is None:
            graph.insert_before(next(iter(graph)), mul)
        else:
            graph.insert_after(producer, mul)
        for node, weight in zip(matmuls, weights, strict=True):
            scaled = (weight.astype(np.float64) * scale[:, None]).astype(weight.dtype)
            old = node.inputs[1]
            new_weight = ir.Value(name=f"{old.name}_smoothed", const_value=ir.tensor(scaled))
            graph.register_initializer(new_weight)
            node.replace_input_with(0, mul.outputs[0])
            node.replace_input_with(1, new_weight)
            kept = old.uses() or old in graph.inputs or old in graph.outputs
            if not kept and old.is_initializer():
                graph.initializers.pop(old.name)  # not kept beside its replacement,
                old.const_value = None  # nor its tensor (the graph's bookkeeping still holds `old`)


def smoothing_scale(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), with dead channels left at 1."""
    x_max = np.maximum(x_max, 1e-5)
    w_max = np.maximum(w_max, 1e-5)
    scale = x_max**alpha / w_max ** (1.0 - alpha)
    return np.clip(scale, 1e-4, 1e4)
