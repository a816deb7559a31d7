"""Compare a quantized model with its float model, overall and layer by layer.

Overall: both models run in ONNX Runtime (ORT) on the same feeds and every output is measured
with `onnxq.scoring.fidelity.measure_fidelity` (mean / min cosine, SQNR, max |error|, top-1 agreement).

Per layer, on a QDQ model written by any tool (onnxq, ORT's `quantize_static`):

    a *layer* is a node other than Q/DQ with at least one input produced by a DequantizeLinear;
    a *quantization point* is one such input. Bypassing a point undoes it for that input only:

        activation  t -> Q -> DQ -> L        L reads t
        constant    W_q -> DQ(axis) -> L      L reads the float constant W
                    (blocked DQs of group-wise weights alike, and a grouped Conv weight's
                    W_q -> DQ(axis, block_size) -> Reshape -> L)

For each layer L two variants of the quantized graph are run on the feeds:

    (a) only L quantized   every point bypassed except L's         -> damage(L)
    (b) L restored         only L's points bypassed                -> recovery(L)

    loss(report)  = mean over outputs of  (1 - top-1 agreement)   for score-like outputs
                                          (1 - cosine)            otherwise
                    + the noise-to-signal ratio 10^(-SQNR/10) / 100 of every output,
                      a continuous tie-breaker between layers that flip no top-1 decision
    damage(L)     = loss(a) - loss(all points bypassed)
    recovery(L)   = loss(quantized model) - loss(b)

Top-1 agreement is per row of the last axis (per time step of a CTC output, per token of a
language model): it counts the decisions that change, which is what accuracy sees; the
noise-to-signal ratio is additive over independent error sources, so it ranks the small ones.
Layers rank by damage, ties by recovery.

A float constant comes from the float model: the node of L's name (in the float model as
onnxq's `prepare` names and folds it, else as written) with a constant of the same shape at
the same input, accepted only when the DQ's values are within half a quantization step of it
(int32 biases follow their weight: a bias-corrected bias is still the float one's). Otherwise
the point keeps its DQ (L reads the dequantized constant) and `LayerDamage.weights` says so.

What to exclude: a Q/DQ pair on a tensor t exists because some node wants it: the layer, the
producer of t when it quantizes its output (onnxq and ORT quantize a Conv's output, so
excluding only the Conv that reads t leaves t quantized), or another consumer of t computing
on quantized values. `LayerDamage.exclude` names all of them that the float model has, and
`exclude_suggestion` joins them for the worst layers: the `--exclude` value that puts those
layers' inputs back in float when the float model is quantized again.

A *dynamic* layer (onnxq's `--activations dynamic`, ORT's `quantize_dynamic`: an integer
MatMul / Conv reading a DynamicQuantizeLinear, its weight an integer constant without a DQ) has
no Q/DQ point to bypass: `dynamic_layers` lists them (the CLI prints them apart), and they
count in every variant as quantized.

Variants are built by rewiring node inputs in the onnx-ir graph (by object identity), one at a
time: serialize (without the Q/DQ nodes left reading nothing), one ORT session, run, undo. The
float outputs are computed once and replayed (`onnxq.scoring.scorer.Reference`). Subgraphs
(If / Loop bodies) are not analysed. A graph that differs from the float one beyond Q/DQ (e.g.
ORT's quantizer folds a Relu into a quantization range unless QDQKeepRemovableActivations is
set) stays different when every point is bypassed: damages then count from that baseline, and
a warning says so.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import model_io
from onnxq.data import Feed, model_input_specs, open_calibration
from onnxq.errors import OnnxqError
from onnxq.passes import prepare
from onnxq.patterns import matches
from onnxq.scoring.fidelity import FidelityReport
from onnxq.scoring.scorer import Reference, Scorer

logger = logging.getLogger(__name__)

DEFAULT_MAX_FEEDS = 16
_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
# The noise-to-signal ratio only breaks ties between layers that flip no top-1 decision.
_NSR_WEIGHT = 0.01
# Per layer: called as progress(done, total).
LayerProgress = Callable[[int, int], None]


class WeightSource(enum.Enum):
    """Where a layer's bypassed constants (weights, biases) come from."""

    FLOAT = "float"  # the float model's constants
    DEQUANTIZED = "dequantized"  # no matching float constant: the DQ's output is kept
    NONE = "none"  # the layer has no quantized constant input


@dataclass(frozen=True)
class LayerDamage:
    """How much one layer's quantization costs, measured in two variants of the model.

    `only_quantized`: the float computation with only this layer's inputs quantized;
    `restored`: the quantized model with this layer's inputs back in float.
    `exclude`: the node names to keep float when re-quantizing the float model so that this
    layer's inputs stay float (see `exclusion_names`); only names of the float model's nodes.
    """

    node: str
    op_type: str
    damage: float
    recovery: float
    only_quantized: FidelityReport
    restored: FidelityReport
    quantized_inputs: tuple[int, ...]
    weights: WeightSource
    exclude: tuple[str, ...]


@dataclass
class _Point:
    """One quantized input of a layer and what the layer reads when it is bypassed."""

    node: ir.Node
    index: int
    quantized: ir.Value  # the DQ output
    bypass: ir.Value | None  # the Q's input or the float constant; None: cannot be bypassed
    dequantize: ir.Node


@dataclass
class _Layer:
    node: ir.Node
    points: list[_Point]
    weights: WeightSource
    exclude: tuple[str, ...]


# --- loading ---------------------------------------------------------------------------------


def _load_pair(float_path: str | Path, quantized_path: str | Path, data: object,
               max_feeds: int | None) -> tuple[onnx.ModelProto, onnx.ModelProto, list[Feed]]:
    float_proto = model_io.load_model(float_path)
    quant_proto = model_io.load_model(quantized_path)
    check_same_interface(float_proto, quant_proto)
    feeds = open_calibration(data, float_proto)
    count = len(feeds) if max_feeds is None else min(len(feeds), max_feeds)
    return float_proto, quant_proto, [feeds.feed(i) for i in range(count)]


def _graph_inputs(proto: onnx.ModelProto) -> list[str]:
    return [spec.name for spec in model_input_specs(proto)]


def check_same_interface(float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto) -> None:
    for kind, a, b in (("inputs", _graph_inputs(float_proto), _graph_inputs(quant_proto)),
                       ("outputs", [v.name for v in float_proto.graph.output],
                        [v.name for v in quant_proto.graph.output])):
        only_float, only_quant = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if only_float or only_quant:
            raise OnnxqError(f"the two models have different {kind}: only the float model has "
                             f"{', '.join(only_float) or 'none'}; only the quantized model has "
                             f"{', '.join(only_quant) or 'none'}")


# --- measuring -------------------------------------------------------------------------------


def _measure(scorer: Scorer, model: onnx.ModelProto | bytes, label: str, reference: Reference,
             feeds: Sequence[Feed]) -> FidelityReport:
    return scorer.measure_fidelity(model, reference, feeds, held_out=False, label=label)


def fidelity_loss(report: FidelityReport) -> float:
    """The loss that damage and recovery are differences of (see the module docstring)."""
    if not report.outputs:
        return 0.0
    losses = []
    for output in report.outputs:
        decisive = 1.0 - output.cosine if output.top1_agreement is None else 1.0 - output.top1_agreement
        noise = 0.0 if np.isinf(output.sqnr_db) else 10.0 ** (-output.sqnr_db / 10.0)
        losses.append(decisive + _NSR_WEIGHT * noise)
    return float(np.mean(losses))


def compare_models(float_path: str | Path, quantized_path: str | Path, data: object,
                   max_feeds: int | None = None) -> FidelityReport:
    """Fidelity of every output of the quantized model to the float model on the feeds.

    Both models must have the same input and output names; the feeds (a .npz, a folder of .npz
    or an iterable of feed dicts) are checked against the float model.
    """
    float_proto, quant_proto, feeds = _load_pair(float_path, quantized_path, data, max_feeds)
    scorer = Scorer()
    reference = scorer.reference(float_proto, feeds)
    return _measure(scorer, quant_proto, "the quantized model", reference, feeds)


# --- finding layers --------------------------------------------------------------------------


def _is_op(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in _QDQ_DOMAINS


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _broadcast(param: np.ndarray, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """A DQ scale / zero point broadcast to the codes' shape (per tensor, per axis or blocked)."""
    if param.size == 1 or not shape:
        return param.reshape(())
    axis = axis % len(shape)
    if block > 0:
        return np.repeat(param, block, axis=axis).take(range(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = -1
    return param.reshape(view)


def _dequantized(dequantize: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(values, quantization step per element) of a DQ of constants; None if not readable."""
    arrays = [_constant(v) for v in dequantize.inputs]
    if len(arrays) < 2 or arrays[0] is None or arrays[1] is None:
        return None
    try:
        codes = arrays[0].astype(np.float64)
        axis = dequantize.attributes.get_int("axis", 1)
        block = dequantize.attributes.get_int("block_size", 0)
        scale = _broadcast(arrays[1].astype(np.float64), codes.shape, axis, block)
        zero = arrays[2] if len(arrays) > 2 and arrays[2] is not None else np.zeros(1)
        zero = _broadcast(zero.astype(np.float64), codes.shape, axis, block)
        return (codes - zero) * scale, np.broadcast_to(np.abs(scale), codes.shape)
    except (ValueError, TypeError) as error:
        logger.info("cannot read DQ %s (%s)", dequantize.name, error)
        return None


def _matches_float(dequantize: ir.Node, float_array: np.ndarray) -> bool:
    """True when the DQ's values are the float constant rounded: within half a step."""
    decoded = _dequantized(dequantize)
    if decoded is None or decoded[0].size != float_array.size:
        return False
    values, step = (d.reshape(float_array.shape) for d in decoded)  # a reshaped grouped view
    reference = float_array.astype(np.float64)
    tolerance = 0.5 * step * 1.01 + 1e-6 * np.abs(reference) + 1e-12
    return bool(np.mean(np.abs(values - reference) <= tolerance) >= 0.999)


def _float_constants(points: list[_Point], candidate: ir.Node) -> dict[int, np.ndarray] | None:
    """The candidate's constants at the points' inputs, if they are the points' float values.

    Every non-int32 constant must be its DQ's float value rounded; int32 ones (biases) follow
    them, since bias correction moves a bias by more than its tiny step."""
    found: dict[int, np.ndarray] = {}
    for point in points:
        array = _constant(candidate.inputs[point.index]) if point.index < len(candidate.inputs) else None
        codes = _constant(point.dequantize.inputs[0])
        if array is None or array.dtype.kind != "f" or codes is None or codes.size != array.size:
            return None
        found[point.index] = array
    weights = [p for p in points if _constant(p.dequantize.inputs[0]).dtype != np.int32] or points
    if not all(_matches_float(p.dequantize, found[p.index]) for p in weights):
        return None
    return found


def _dequantize_behind(value: ir.Value | None) -> ir.Node | None:
    """The producer of `value`; through a Reshape of a DQ of constants (a group-wise Conv
    weight, stored as (O, I * kh * kw) and reshaped back), that DQ."""
    producer = value.producer() if value is not None else None
    if _is_op(producer, "Reshape") and _constant(producer.inputs[1]) is not None:
        inner = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        if _is_op(inner, "DequantizeLinear") and _constant(inner.inputs[0]) is not None:
            return inner
    return producer


def _points_of(node: ir.Node) -> list[_Point]:
    points = []
    for index, value in enumerate(node.inputs):
        dequantize = _dequantize_behind(value)
        if not _is_op(dequantize, "DequantizeLinear"):
            continue
        source = dequantize.inputs[0]
        quantize = source.producer() if source is not None else None
        bypass = quantize.inputs[0] if _is_op(quantize, "QuantizeLinear") else None
        points.append(_Point(node, index, value, bypass, dequantize))
    return points


def _restore_constants(layer_points: list[_Point], name: str,
                       float_nodes: Sequence[dict[str, ir.Node]]) -> WeightSource:
    """Point the constant points at float copies of the float model's constants, if found."""
    constants = [p for p in layer_points
                 if p.bypass is None and _constant(p.dequantize.inputs[0]) is not None]
    if not constants:
        return WeightSource.NONE
    for nodes in float_nodes:
        candidate = nodes.get(name)
        found = _float_constants(constants, candidate) if candidate is not None else None
        if found is not None:
            for point in constants:
                array = np.ascontiguousarray(found[point.index])
                # Named after the DQ output and the input it replaces: unique in the graph.
                point.bypass = ir.Value(name=f"{point.quantized.name}.float.{name}.{point.index}",
                                        const_value=ir.tensor(array))
            return WeightSource.FLOAT
    logger.info("layer %s: no float constant matches its DQ values; they stay dequantized", name)
    return WeightSource.DEQUANTIZED


def _selected(node: ir.Node, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(matches(node, p) for p in patterns)


def _find_layers(model: ir.Model, float_nodes: Sequence[dict[str, ir.Node]]) -> list[_Layer]:
    layers = []
    for node in model.graph:
        if _is_op(node, "QuantizeLinear") or _is_op(node, "DequantizeLinear"):
            continue
        points = _points_of(node)
        if not points:
            continue
        weights = _restore_constants(points, node.name or "", float_nodes)
        if not any(p.bypass is not None for p in points):
            logger.info("layer %s: no quantized input can be bypassed; skipped", node.name)
            continue
        names = tuple(n for n in exclusion_names(node) if n in float_nodes[0])
        layers.append(_Layer(node, points, weights, names))
    return layers


def _reads_weight(node: ir.Node) -> bool:
    return any(_constant(p.dequantize.inputs[0]) is not None for p in _points_of(node))


def _is_quantized(node: ir.Node) -> bool:
    """A node that computes on quantized values as a quantizer leaves it: it reads a quantized
    constant (a weight), or it reads a DQ and its output is quantized again (an integer op or a
    chain op sharing its input's parameters). A float op that merely reads a DQ is not."""
    if _reads_weight(node):
        return True
    quantized_output = any(_is_op(use.node, "QuantizeLinear") for out in node.outputs for use in out.uses())
    return quantized_output and bool(_points_of(node))


def exclusion_names(layer: ir.Node) -> list[str]:
    """The nodes a quantizer must keep float so that `layer`'s quantized inputs become float.

    A Q/DQ pair on a tensor t is there because some node wanted it: the layer itself, the
    producer of t when it quantizes its output (onnxq and ORT quantize a Conv's output), or
    another consumer of t that computes on quantized values. All of them are named; the layer
    only when it is itself quantized (a float op reading a DQ gains nothing by exclusion).
    """
    names = [layer.name] if _is_quantized(layer) else []
    for point in _points_of(layer):
        if point.bypass is None or point.bypass.const_value is not None:
            continue  # a constant: the layer's own
        quantize = point.dequantize.inputs[0].producer()
        producer = point.bypass.producer()
        if producer is not None and _is_quantized(producer):
            names.append(producer.name)
        for dequantize in (use.node for out in quantize.outputs for use in out.uses()):
            for consumer in (use.node for out in dequantize.outputs for use in out.uses()):
                if consumer is not layer and _is_quantized(consumer):
                    names.append(consumer.name)
    return [name for name in dict.fromkeys(names) if name]


_INTEGER_OPS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


@dataclass(frozen=True)
class DynamicLayer:
    """A layer whose input is quantized per batch at run time."""

    node: str
    op_type: str


def dynamic_layers(quantized_path: str | Path) -> list[DynamicLayer]:
    """The integer MatMul / Conv nodes that read a DynamicQuantizeLinear (or quantize their
    input themselves: DynamicQuantizeMatMul), in graph order."""
    model = model_io.to_ir(model_io.load_model(quantized_path))
    return [DynamicLayer(node.name or "", node.op_type) for node in model.graph
            if node.op_type in _INTEGER_OPS and node.domain in _QDQ_DOMAINS and _reads_dynamic(node)]


def _reads_dynamic(node: ir.Node) -> bool:
    if node.op_type == "DynamicQuantizeMatMul":
        return True
    source = node.inputs[0] if node.inputs else None
    return source is not None and _is_op(source.producer(), "DynamicQuantizeLinear")


def _select(layers: list[_Layer], patterns: Sequence[str] | None) -> list[_Layer]:
    """The layers matching any pattern (all when None); a pattern matching none is an error."""
    for pattern in patterns or ():
        if not any(_selected(layer.node, [pattern]) for layer in layers):
            raise OnnxqError(f"layer selection {pattern!r} matches no quantized layer "
                             f"(node name, op type or glob)")
    return [layer for layer in layers if _selected(layer.node, patterns)]


# --- variants --------------------------------------------------------------------------------


def _serialized_with(model: ir.Model, bypassed: Sequence[_Point]) -> bytes:
    """The model with `bypassed` points rewired to their float inputs, serialized without the
    Q/DQ nodes that no longer feed anything; the graph is left as it was."""
    graph = model.graph
    edits = [p for p in bypassed if p.bypass is not None]
    registered = []
    try:
        for point in edits:
            if point.bypass.const_value is not None and not point.bypass.is_initializer():
                graph.register_initializer(point.bypass)
                registered.append(point.bypass)
            point.node.replace_input_with(point.index, point.bypass)
        proto = model_io.to_proto(model)
        _drop_dead_qdq(graph, proto.graph)
        return proto.SerializeToString()
    finally:
        for point in reversed(edits):
            point.node.replace_input_with(point.index, point.quantized)
        for value in registered:
            graph.initializers.pop(value.name)


def _drop_dead_qdq(graph: ir.Graph, graph_proto: onnx.GraphProto) -> None:
    """Remove from the serialized graph the DQs no node reads any more, the Qs that fed only
    them, and the constants only they read. Nodes are matched by position: `to_proto` writes
    the graph's nodes in order."""
    nodes = list(graph)
    if len(nodes) != len(graph_proto.node):
        return
    outputs = {id(v) for v in graph.outputs}
    dead: set[int] = set()
    for op_type in ("DequantizeLinear", "QuantizeLinear"):
        for node in nodes:
            if _is_op(node, op_type) and all(id(out) not in outputs and
                                             all(id(use.node) in dead for use in out.uses())
                                             for out in node.outputs):
                dead.add(id(node))
    if not dead:
        return
    unused = {value.name for node in nodes if id(node) in dead for value in node.inputs
              if value is not None and value.is_initializer()
              and all(id(use.node) in dead for use in value.uses())}
    kept = [proto for node, proto in zip(nodes, graph_proto.node, strict=True) if id(node) not in dead]
    del graph_proto.node[:]
    graph_proto.node.extend(kept)
    for field in (graph_proto.initializer, graph_proto.input):
        kept_values = [v for v in field if v.name not in unused]
        del field[:]
        field.extend(kept_values)


def _prepared_float_nodes(float_proto: onnx.ModelProto) -> list[dict[str, ir.Node]]:
    """Nodes by name of the float model as onnxq prepares it, and as written."""
    named = []
    for model in (prepare(model_io.to_ir(float_proto)), model_io.to_ir(float_proto)):
        named.append({node.name: node for node in model.graph if node.name})
    return named


def rank_layers(float_path: str | Path, quantized_path: str | Path, data: object,
                max_feeds: int | None = DEFAULT_MAX_FEEDS, layers: Sequence[str] | None = None,
                progress: LayerProgress | None = None) -> list[LayerDamage]:
    """Per-layer damage and recovery of a QDQ model, worst layer first (see module docstring).

    Args:
        float_path, quantized_path: the float model and a QDQ quantization of it.
        data: feeds as for `compare_models`; at most `max_feeds` are used.
        layers: only these layers: node names, op types or globs over node names (each must
            match a layer).
        progress: called as progress(done, total) after each layer.
    """
    float_proto, quant_proto, feeds = _load_pair(float_path, quantized_path, data, max_feeds)
    scorer = Scorer()
    reference = scorer.reference(float_proto, feeds)
    float_nodes = _prepared_float_nodes(float_proto)
    model = model_io.to_ir(quant_proto)
    del quant_proto
    all_layers = _find_layers(model, float_nodes)
    chosen = _select(all_layers, layers)
    variants = _Variants(scorer, model, reference, feeds, [p for layer in all_layers for p in layer.points])
    quantized = variants.measure([], "the quantized model")
    floor = variants.measure(variants.every_point, "the model with every layer restored")
    logger.info("%d layers; loss quantized %.4g, all restored %.4g", len(all_layers),
                fidelity_loss(quantized), fidelity_loss(floor))
    if fidelity_loss(floor) > 0.25 * fidelity_loss(quantized):
        logger.warning("with every Q/DQ bypassed the model is still far from float (loss %.4g, the "
                       "quantized model's %.4g): it differs from the float model beyond Q/DQ (e.g. "
                       "a Relu folded into a quantization range); damages count from there",
                       fidelity_loss(floor), fidelity_loss(quantized))
    results = []
    for done, layer in enumerate(chosen, 1):
        results.append(_layer_damage(variants, layer, fidelity_loss(floor), fidelity_loss(quantized)))
        if progress is not None:
            progress(done, len(chosen))
    return sorted(results, key=lambda r: (-r.damage, -r.recovery, r.node))


@dataclass
class _Variants:
    """The quantized graph, every point of it, and what its variants are measured against."""

    scorer: Scorer
    model: ir.Model
    reference: Reference
    feeds: Sequence[Feed]
    every_point: list[_Point]

    def measure(self, bypassed: Sequence[_Point], label: str) -> FidelityReport:
        """Fidelity of the model with the `bypassed` points rewired to their float inputs."""
        return _measure(self.scorer, _serialized_with(self.model, bypassed), label, self.reference,
                        self.feeds)


def _layer_damage(variants: _Variants, layer: _Layer, floor_loss: float,
                  quantized_loss: float) -> LayerDamage:
    own = {id(p) for p in layer.points}
    label = f"the model with layer {layer.node.name} "
    only = variants.measure([p for p in variants.every_point if id(p) not in own], label + "alone quantized")
    restored = variants.measure(layer.points, label + "restored")
    return LayerDamage(
        node=layer.node.name or "", op_type=layer.node.op_type,
        damage=fidelity_loss(only) - floor_loss, recovery=quantized_loss - fidelity_loss(restored),
        only_quantized=only, restored=restored,
        quantized_inputs=tuple(p.index for p in layer.points if p.bypass is not None),
        weights=layer.weights, exclude=layer.exclude)


def exclude_suggestion(ranked: Sequence[LayerDamage], top: int) -> str:
    """The `--exclude` value (comma-separated node names) for the worst `top` layers.

    The names are the layers' `exclude` names (each layer and the quantized nodes that share
    its quantized inputs), in rank order without repeats, from layers that lose fidelity
    (damage > 0); they are nodes of the float model, so `onnxq quantize FLOAT OUT --exclude
    <value>` accepts them. A comma inside a name becomes '?', the glob that matches it.
    """
    names: dict[str, None] = {}
    for layer in [layer for layer in ranked if layer.damage > 0][:max(top, 0)]:
        names.update(dict.fromkeys(name.replace(",", "?") for name in layer.exclude))
    return ",".join(names)
