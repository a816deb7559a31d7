"""Per-layer sensitivity to weight bits, measured through ONNX Runtime.

The damage of quantizing one layer's weights at b bits is measured by running a base model with
only that layer's weight (and its corrected bias) replaced by the dequantized values, against
the float model's outputs on the same calibration feeds. The base is either the float model
(weights alone) or the 8-bit quantized model (activations and every other weight quantized, so
the probe sees how the layer's error meets the activations' rounding). To do this for every
layer and bit-width without building a session each time, `WeightProbe` turns the weights (and
biases) of the probed layers into graph inputs of one session: the float values are fed by
default, and a probe feeds one layer's quantized values in their place.

Damage measures (all >= 0, 0 when the outputs equal float's), per output then averaged:

    mse      sum ||y_q - y||^2 / sum ||y||^2 over the feeds (noise-to-signal energy)
    kl       KL(softmax(y) || softmax(y_q)) over the last axis, averaged over rows
    infonce  the contrastive loss of quantized rows against float rows (each row must pick
             its own float row among the others, temperature 0.1; rows of all feeds pooled),
             minus the same loss of float against itself

Besides the damage, `layer_macs` gives each layer's multiply-accumulates on one feed (for bit
operation budgets) and `tied_layers` the groups of layers that must share their bits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq import model_io
from onnxq.data import Feed
from onnxq.plan import QuantPlan, WeightQuant

INFONCE_TEMPERATURE = 0.1
INFONCE_MAX_ROWS = 512

Outputs = list[list[np.ndarray]]  # [feed][output]


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _rows(outputs: Outputs, index: int) -> np.ndarray:
    return np.concatenate([np.asarray(feed[index], np.float64).reshape(-1, feed[index].shape[-1])
                           if feed[index].ndim else np.asarray(feed[index], np.float64).reshape(1, 1)
                           for feed in outputs])


def _mse(reference: np.ndarray, quantized: np.ndarray) -> float:
    return float(np.sum((quantized - reference) ** 2) / max(np.sum(reference ** 2), 1e-30))


def _kl(reference: np.ndarray, quantized: np.ndarray) -> float:
    p, q = _softmax(reference), _softmax(quantized)
    return float(np.mean(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)), axis=-1)))


def _contrastive_loss(anchors: np.ndarray, targets: np.ndarray) -> float:
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)

    logits = unit(anchors) @ unit(targets).T / INFONCE_TEMPERATURE
    logits -= logits.max(axis=-1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return float(-np.mean(np.diagonal(log_softmax)))


def _infonce(reference: np.ndarray, quantized: np.ndarray) -> float:
    if len(reference) > INFONCE_MAX_ROWS:
        keep = np.linspace(0, len(reference) - 1, INFONCE_MAX_ROWS).astype(int)
        reference, quantized = reference[keep], quantized[keep]
    return max(_contrastive_loss(quantized, reference) - _contrastive_loss(reference, reference), 0.0)


DAMAGE_MEASURES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "mse": _mse, "kl": _kl, "infonce": _infonce}


def output_damage(measure: str, reference: Outputs, quantized: Outputs) -> float:
    """The damage of `quantized` outputs against `reference`, averaged over the outputs."""
    function = DAMAGE_MEASURES[measure]
    count = len(reference[0])
    return float(np.mean([function(_rows(reference, i), _rows(quantized, i)) for i in range(count)]))


class WeightProbe:
    """A model with the probed layers' weights and biases as graph inputs.

    `model` is either the prepared float model or a quantized (QDQ) copy of it in which the
    probed layers read their weight and bias through DequantizeLinear; `defaults` gives each
    probed layer's (weight, bias or None) values fed when the layer is not the one probed.
    """

    def __init__(self, model: ir.Model, plan: QuantPlan,
                 defaults: Mapping[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
        probe = model_io.to_ir(model_io.to_proto(model))  # a copy
        nodes = {node.name: node for node in probe.graph}
        bias_index = {spec.node: spec.input_index for spec in plan.biases}
        specs = {spec.node: spec for spec in plan.weights}
        self.defaults: dict[str, np.ndarray] = {}
        self.weight_inputs: dict[str, str] = {}
        self.bias_inputs: dict[str, str] = {}
        for number, (layer, (weight, bias)) in enumerate(defaults.items()):
            node = nodes[layer]
            self.weight_inputs[layer] = self._lift(probe.graph, node, specs[layer].input_index,
                                                   f"onnxq_probe_w{number}", weight)
            if layer in bias_index and bias is not None:
                self.bias_inputs[layer] = self._lift(probe.graph, node, bias_index[layer],
                                                     f"onnxq_probe_b{number}", bias)
        RemoveUnusedNodesPass()(probe)
        proto = model_io.to_proto(probe)
        self.batch_axis_free = all(
            graph_input.type.tensor_type.shape.dim and
            not graph_input.type.tensor_type.shape.dim[0].HasField("dim_value")
            for graph_input in proto.graph.input if graph_input.name not in self.defaults)
        self.session = model_io.create_session(proto, "the sensitivity probe")
        self.output_names = [output.name for output in proto.graph.output]

    def _lift(self, graph: ir.Graph, node: ir.Node, index: int, name: str, array: np.ndarray) -> str:
        array = np.asarray(array, np.float32)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
        graph.inputs.append(value)
        node.replace_input_with(index, value)
        self.defaults[name] = array
        return name

    def batched(self, feeds: Sequence[Feed]) -> list[Feed]:
        """Feeds of one shape joined along the batch axis when the model allows it (one run
        instead of many; the damage measures pool rows, so the result is the same)."""
        shapes = {tuple((name, array.shape) for name, array in sorted(feed.items())) for feed in feeds}
        if not self.batch_axis_free or len(shapes) != 1 or len(feeds) < 2:
            return list(feeds)
        return [{name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}]

    def run(self, feeds: Sequence[Feed], weight: tuple[str, np.ndarray, np.ndarray | None] | None = None
            ) -> Outputs:
        """Outputs over the feeds; `weight` = (layer, weight values, bias values or None)
        replaces one layer's float weight (and bias)."""
        inputs = dict(self.defaults)
        if weight is not None:
            layer, values, bias = weight
            inputs[self.weight_inputs[layer]] = values.astype(np.float32)
            if bias is not None and layer in self.bias_inputs:
                inputs[self.bias_inputs[layer]] = bias.astype(np.float32)
        return [self.session.run(self.output_names, {**feed, **inputs}) for feed in feeds]


def measure_sensitivity(
    probe: WeightProbe,
    feeds: Sequence[Feed],
    candidates: Mapping[str, Sequence[int]],
    values: Callable[[str, int], tuple[np.ndarray, np.ndarray | None]],
    measure: str,
    progress: Callable[[int], None] | None = None,
    float_session: ort.InferenceSession | None = None,
) -> dict[str, dict[int, float]]:
    """{layer: {bits: damage}}: each layer alone at each of its candidate bit-widths, the rest
    float. `values(layer, bits)` gives the dequantized weight and corrected bias (or None).
    The reference outputs come from `float_session` (default: `probe` with its defaults, when
    the probe's base is the float model)."""
    feeds = probe.batched(feeds)
    if float_session is not None:
        reference = [float_session.run(probe.output_names, feed) for feed in feeds]
    else:
        reference = probe.run(feeds)
    table: dict[str, dict[int, float]] = {}
    for layer, bit_widths in candidates.items():
        table[layer] = {bits: output_damage(measure, reference,
                                            probe.run(feeds, (layer, *values(layer, bits))))
                        for bits in bit_widths}
        if progress is not None:
            progress(1)
    return table


def layer_macs(model: ir.Model, layers: Sequence[WeightQuant], feed: Feed) -> dict[str, int]:
    """Multiply-accumulates of each layer on one feed, from shapes inferred for that feed."""
    proto = model_io.to_proto(model)
    for graph_input in proto.graph.input:
        if graph_input.name in feed:
            dims = graph_input.type.tensor_type.shape.dim
            for dim, size in zip(dims, feed[graph_input.name].shape, strict=True):
                dim.ClearField("dim_param")
                dim.dim_value = size
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    nodes = {node.name: node for node in model.graph}
    macs = {}
    for spec in layers:
        node = nodes[spec.node]
        weight = node.inputs[spec.input_index].const_value
        output = shapes.get(node.outputs[0].name)
        if node.op_type == "Gather" or output is None:
            macs[spec.node] = 0
        elif node.op_type in ("Conv", "ConvTranspose"):
            # each output element of a Conv takes (C_in / group) * prod(kernel) MACs
            per_output = int(np.prod(weight.shape[1:]))
            macs[spec.node] = int(np.prod(output)) * per_output
        else:  # MatMul / Gemm: output elements x K
            k = weight.shape[-2] if node.op_type == "MatMul" else weight.shape[1 - spec.axis]
            macs[spec.node] = int(np.prod(output)) * int(k)
    return macs


def tied_layers(model: ir.Model, plan: QuantPlan) -> list[list[str]]:
    """Groups of layers that must share their weight bits: layers reading the same activation
    tensor (e.g. an attention block's Q, K and V projections) and the layers whose outputs
    meet at a quantized join (a residual Add). Every layer is in exactly one group."""
    nodes = {node.name: node for node in model.graph}
    layers = [spec.node for spec in plan.weights]
    parent = {name: name for name in layers}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def tie(names: list[str]) -> None:
        for other in names[1:]:
            parent[root(other)] = root(names[0])

    readers: dict[str, list[str]] = {}
    for name in layers:
        node = nodes[name]
        if node.op_type != "Gather" and node.inputs[0] is not None:
            readers.setdefault(node.inputs[0].name, []).append(name)
    for names in readers.values():
        tie(names)
    producers = {node.outputs[0].name: node.name for node in model.graph if node.name in parent}
    for join in plan.quantized_nodes:
        node = nodes.get(join)
        if node is not None and node.op_type == "Add":
            tie([producers[v.name] for v in node.inputs if v is not None and v.name in producers])
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(root(name), []).append(name)
    return list(groups.values())
