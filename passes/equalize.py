"""Channel equalization: even out the channel ranges of a quantized activation, exactly, by
moving a per-channel factor into the constants on both sides of it.

One scale per activation tensor wastes the int8 grid when channels differ in range: a Conv
output whose channels span 0.1 and 20 quantizes the small ones to a few levels. Where the
tensor x (channels on axis 1) sits between ops that can take a per-channel factor s,

    producer side: x / s     Conv (weight and bias of output channel c / s_c),
                             Mul(u, k) (k / s), Add(u, d) (d / s, and u / s in turn)
    consumer side: (x / s) s every use is Mul(x, k) (k s), a depthwise Conv (its filters of
                             input channel c times s_c), optionally a dense Conv (its weights'
                             input channel c times s_c), or Relu / MaxPool (they commute with a
                             positive factor) whose uses take it in turn

the float model computes the same function, and x / s has channels of one range:
s_c = max|x_c| / max_c' max|x_c'| (a channel below 1% of the largest is raised to 1% only).
Neither side costs the weights anything: Conv weights are quantized per output channel, and a
depthwise filter's output channel is its input channel; a scalar Mul or Add becomes a
per-channel one, with no new node. A dense Conv reading x does pay (its weights' input
channels, quantized together, take the spread), so there s is SmoothQuant's balance
s_c = max|x_c|^alpha / max|W_:c|^(1 - alpha) (`dense_alpha`; None: dense Convs end the search).

Unlike cross-layer equalization of Conv pairs, this reaches
through the channel-wise affine ops that models put around their activations (e.g. PP-OCRv4's
learnable affine blocks: Conv -> Mul -> Add -> HardSwish -> Mul -> Add -> Conv).

Constants are replaced by new initializers, never edited in place (they may be shared).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.passes.smooth import smoothing_scale

logger = logging.getLogger(__name__)

SMALLEST_FACTOR = 0.01  # a channel's factor relative to the largest: keeps near-dead channels sane
_PASS_THROUGH = frozenset({"Relu", "MaxPool"})
_CONV_ROLES = ("conv_out", "depthwise_in", "conv_in")


@dataclass(frozen=True)
class _Edit:
    """Multiply constant input `index` of `node` by the factor (power +1 or -1), laid out for
    `role`: 'affine' (broadcast on axis 1 of a rank-`rank` tensor), 'conv_out' (weight axis 0,
    bias), 'depthwise_in' (weight axis 0, grouped by input channel)."""

    node: ir.Node
    role: str
    power: int
    rank: int


def _is_onnx(node: ir.Node, *ops: str) -> bool:
    return node.op_type in ops and node.domain in ("", "ai.onnx")


def _constant_operand(node: ir.Node, value: ir.Value) -> int | None:
    """Index of the constant operand of a binary Mul/Add whose other operand is `value`."""
    if len(node.inputs) != 2:
        return None
    for index, operand in enumerate(node.inputs):
        other = node.inputs[1 - index]
        constant = operand is not None and operand is not value and operand.const_value is not None
        if other is value and constant:
            return index
    return None


def _conv_weights_constant(node: ir.Node) -> bool:
    return all(v is None or v.const_value is not None for v in node.inputs[1:]) and len(node.inputs) >= 2 \
        and node.inputs[1] is not None and len(node.inputs[1].shape or ()) >= 3


def _is_depthwise(node: ir.Node, channels: int) -> bool:
    group = node.attributes.get_int("group", 1)
    return group == channels and group > 1 and node.inputs[1].const_value.shape[1] == 1


def _producer_edits(value: ir.Value, rank: int) -> list[_Edit] | None:
    """How to divide `value` by a per-channel factor at its producer; None: it cannot."""
    node = value.producer()
    if node is None:
        return None
    if _is_onnx(node, "Conv") and _conv_weights_constant(node) and node.outputs[0] is value:
        return [_Edit(node, "conv_out", -1, rank)]
    if _is_onnx(node, "Mul", "Add"):
        for index in (0, 1):
            if node.inputs[index] is None or node.inputs[index].const_value is None:
                continue
            other = node.inputs[1 - index]
            if other is None or other.const_value is not None:
                return None
            edits = [_Edit(node, f"affine{index}", -1, rank)]
            if node.op_type == "Mul":
                return edits
            if len(other.uses()) != 1 or _is_graph_output(other):
                return None
            upstream = _producer_edits(other, rank)
            return None if upstream is None else edits + upstream
    return None


def _is_graph_output(value: ir.Value) -> bool:
    return value.graph is not None and value in value.graph.outputs


def _consumer_edits(value: ir.Value, rank: int, channels: int, dense: bool = False) -> list[_Edit] | None:
    """How every use of `value` takes back the factor; None: some use cannot."""
    if not value.uses() or _is_graph_output(value):
        return None
    edits: list[_Edit] = []
    for use in value.uses():
        node = use.node
        index = _constant_operand(node, value) if _is_onnx(node, "Mul") else None
        if index is not None:
            edits.append(_Edit(node, f"affine{index}", +1, rank))
        elif (_is_onnx(node, "Conv") and use.idx == 0 and _conv_weights_constant(node)
              and _is_depthwise(node, channels)):
            edits.append(_Edit(node, "depthwise_in", +1, rank))
        elif (dense and _is_onnx(node, "Conv") and use.idx == 0 and _conv_weights_constant(node)
              and node.attributes.get_int("group", 1) == 1):
            edits.append(_Edit(node, "conv_in", +1, rank))
        elif _is_onnx(node, *_PASS_THROUGH) and use.idx == 0 and len(node.outputs) == 1:
            further = _consumer_edits(node.outputs[0], rank, channels, dense)
            if further is None:
                return None
            edits.extend(further)
        else:
            return None
    return edits


def _edits_for(value: ir.Value, channels: int, dense: bool,
               skip_nodes: frozenset[str]) -> list[_Edit] | None:
    rank = len(value.shape) if value.shape is not None else 0
    if rank < 3 or value.dtype != ir.DataType.FLOAT:
        return None
    producer = _producer_edits(value, rank)
    consumer = _consumer_edits(value, rank, channels, dense) if producer is not None else None
    edits = producer + consumer if consumer is not None else []
    if not any(edit.role in _CONV_ROLES for edit in edits):
        return None  # a Conv on one side: axis 1 is its channels
    return None if any(edit.node.name in skip_nodes for edit in edits) else edits


def _float_activations(graph: ir.Graph) -> Iterator[ir.Value]:
    for node in graph:
        for value in node.outputs:
            if value.dtype == ir.DataType.FLOAT and value.shape is not None and len(value.shape) >= 3:
                yield value


def equalization_candidates(model: ir.Model, skip_nodes: frozenset[str] = frozenset(),
                            dense: bool = False) -> list[str]:
    """Names of the activations (channels on axis 1) both of whose sides can take a factor
    (`dense`: a Conv with group 1 may take it in its input channels)."""
    names = []
    for value in _float_activations(model.graph):
        channel_dim = value.shape[1]
        if not isinstance(channel_dim, int) or channel_dim < 2:
            continue
        if _edits_for(value, channel_dim, dense, skip_nodes) is not None:
            names.append(value.name)
    return names


def equalizing_factor(channel_absmax: np.ndarray) -> np.ndarray:
    """s_c = max|x_c| / max|x|, at least SMALLEST_FACTOR (dead channels keep factor 1)."""
    absmax = np.asarray(channel_absmax, np.float64)
    top = absmax.max() if absmax.size else 0.0
    if not np.isfinite(top) or top <= 0.0:
        return np.ones_like(absmax)
    return np.where(absmax > 0.0, np.maximum(absmax / top, SMALLEST_FACTOR), 1.0)


class EqualizeChannelsPass(ir.passes.InPlacePass):
    """Equalize the channels of the activations in `channel_absmax` (name -> max|x_c| on axis 1)."""

    def __init__(self, channel_absmax: dict[str, np.ndarray],
                 skip_nodes: frozenset[str] = frozenset(), dense_alpha: float | None = None) -> None:
        super().__init__()
        self.channel_absmax = channel_absmax
        self.skip_nodes = skip_nodes
        self.dense_alpha = dense_alpha

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        equalized = 0
        for value in list(_float_activations(graph)):
            absmax = self.channel_absmax.get(value.name)
            if absmax is None or absmax.ndim != 1:
                continue
            edits = _edits_for(value, absmax.size, self.dense_alpha is not None, self.skip_nodes)
            if edits is None:
                continue
            factor = _factor(absmax, edits, self.dense_alpha)
            if np.allclose(factor, 1.0):
                continue
            for edit in edits:
                _apply(graph, edit, factor)
            equalized += 1
        if equalized:
            logger.info("equalized the channels of %d activations", equalized)
        return ir.passes.PassResult(model, modified=equalized > 0)


def _factor(absmax: np.ndarray, edits: list[_Edit], dense_alpha: float | None) -> np.ndarray:
    """Equalizing, or SmoothQuant's balance where a dense Conv pays for it in its weights."""
    dense = [edit.node.inputs[1].const_value.numpy() for edit in edits if edit.role == "conv_in"]
    if not dense or dense_alpha is None:
        return equalizing_factor(absmax)
    reduce_axes = tuple(axis for axis in range(dense[0].ndim) if axis != 1)
    w_max = np.max([np.abs(w).max(axis=reduce_axes) for w in dense], axis=0)
    return smoothing_scale(absmax.astype(np.float64), w_max.astype(np.float64), dense_alpha)


def _apply(graph: ir.Graph, edit: _Edit, factor: np.ndarray) -> None:
    scaled = factor ** edit.power
    node = edit.node
    if edit.role.startswith("affine"):
        index = int(edit.role[-1])
        constant = node.inputs[index].const_value.numpy()
        shape = (1, factor.size) + (1,) * (edit.rank - 2)
        product = constant.astype(np.float64) * scaled.reshape(shape)
        _replace_constant(graph, node, index, product, constant.dtype)
        return
    weight = node.inputs[1].const_value.numpy()
    if edit.role == "conv_in":
        shape = (1, -1) + (1,) * (weight.ndim - 2)
        _replace_constant(graph, node, 1, weight.astype(np.float64) * scaled.reshape(shape), weight.dtype)
        return
    if edit.role == "conv_out":
        per_output = scaled
    else:  # depthwise_in: output channel o reads input channel o // multiplier
        per_output = np.repeat(scaled, weight.shape[0] // factor.size)
    layout = (-1,) + (1,) * (weight.ndim - 1)
    _replace_constant(graph, node, 1, weight.astype(np.float64) * per_output.reshape(layout), weight.dtype)
    if edit.role == "conv_out" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2].const_value.numpy()
        _replace_constant(graph, node, 2, bias.astype(np.float64) * per_output, bias.dtype)


def _replace_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, dtype: np.dtype) -> None:
    old = node.inputs[index]
    value = ir.Value(name=f"{old.name}_eq_{node.name}", const_value=ir.tensor(array.astype(dtype)))
    while value.name in graph.initializers:
        value.name = f"{value.name}_"
    graph.register_initializer(value)
    node.replace_input_with(index, value)
    if not old.uses() and old.is_initializer() and old not in graph.inputs:
        graph.initializers.pop(old.name)
