"""Per-layer sensitivity to weight bits, measured through ONNX Runtime.

The damage of quantizing one layer's weights at b bits is measured by running a base model with
only that layer's weight (and its corrected bias) replaced by the dequantized values, against
the float model's outputs on the same calibration feeds. The base is either the float model
(weights alone) or the 8-bit quantized model (activations and every other weight quantized, so
the probe sees how the layer's error meets the activations' rounding). To do this for every
layer and bit-width without building a session each time, `WeightProbe` turns the weights (and
biases) of the probed layers into graph inputs of one session (an
`onnxq.scoring.scorer.LiftedModel`): the float values are fed by default, and a probe feeds
one layer's quantized values in their place.

The damage measures (mse, kl, infonce) are defined in `onnxq.scoring.damage`.

Besides the damage, `layer_macs` gives each layer's multiply-accumulates on one feed (for bit
operation budgets) and `tied_layers` the groups of layers that must share their bits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxq import model_io
from onnxq.data import Feed
from onnxq.plan import QuantPlan, WeightQuant
from onnxq.scoring.damage import DamageMeasure, Outputs, output_damage
from onnxq.scoring.scorer import LiftedModel, Reference, Scorer


class WeightProbe:
    """A model with the probed layers' weights and biases as graph inputs.

    `model` is either the prepared float model or a quantized (QDQ) copy of it in which the
    probed layers read their weight and bias through DequantizeLinear; `defaults` gives each
    probed layer's (weight, bias or None) values fed when the layer is not the one probed.
    Layer number n's weight is the input `onnxq_probe_w{n}`, its bias `onnxq_probe_b{n}`.
    """

    def __init__(self, model: ir.Model, plan: QuantPlan,
                 defaults: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
                 scorer: Scorer | None = None) -> None:
        bias_index = {spec.node: spec.input_index for spec in plan.biases}
        specs = {spec.node: spec for spec in plan.weights}
        lifted: dict[tuple[str, int], np.ndarray] = {}
        names: dict[tuple[str, int], str] = {}
        self.weight_inputs: dict[str, str] = {}
        self.bias_inputs: dict[str, str] = {}
        for number, (layer, (weight, bias)) in enumerate(defaults.items()):
            slot = (layer, specs[layer].input_index)
            lifted[slot], names[slot] = np.asarray(weight, np.float32), f"onnxq_probe_w{number}"
            self.weight_inputs[layer] = names[slot]
            if layer in bias_index and bias is not None:
                slot = (layer, bias_index[layer])
                lifted[slot], names[slot] = np.asarray(bias, np.float32), f"onnxq_probe_b{number}"
                self.bias_inputs[layer] = names[slot]
        self.lifted: LiftedModel = (scorer or Scorer()).probe(model, lifted, names,
                                                               "the sensitivity probe")

    @property
    def output_names(self) -> list[str]:
        return self.lifted.output_names

    @property
    def defaults(self) -> dict[str, np.ndarray]:
        return self.lifted.defaults

    def batched(self, feeds: Sequence[Feed]) -> list[Feed]:
        """Feeds of one shape joined along the batch axis when the model allows it (one run
        instead of many; the damage measures pool rows, so the result is the same)."""
        return self.lifted.batched(feeds)

    def run(self, feeds: Sequence[Feed], weight: tuple[str, np.ndarray, np.ndarray | None] | None = None
            ) -> Outputs:
        """Outputs over the feeds; `weight` = (layer, weight values, bias values or None)
        replaces one layer's float weight (and bias)."""
        overrides = {}
        if weight is not None:
            layer, values, bias = weight
            overrides[self.weight_inputs[layer]] = values
            if bias is not None and layer in self.bias_inputs:
                overrides[self.bias_inputs[layer]] = bias
        return self.lifted.run(feeds, overrides)


def measure_sensitivity(
    probe: WeightProbe,
    feeds: Sequence[Feed],
    candidates: Mapping[str, Sequence[int]],
    values: Callable[[str, int], tuple[np.ndarray, np.ndarray | None]],
    measure: DamageMeasure | str,
    progress: Callable[[int], None] | None = None,
    float_session: ort.InferenceSession | Reference | None = None,
) -> dict[str, dict[int, float]]:
    """{layer: {bits: damage}}: each layer alone at each of its candidate bit-widths, the rest
    float. `values(layer, bits)` gives the dequantized weight and corrected bias (or None).
    The reference outputs come from `float_session`, an ORT session or a cached `Reference`
    (default: `probe` with its defaults, when the probe's base is the float model)."""
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
