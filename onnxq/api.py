"""`onnxq.quantize`: the whole pipeline, from a float model and calibration data to a verified
quantized model held in memory.

    load -> prepare passes -> annotate (QuantPlan) -> collect statistics (ORT)
      -> initial qparams -> emit (Q/DQ) -> verify on held-out feeds -> QuantResult

Nothing is written until `QuantResult.save`, which writes atomically and never over the input.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import model_io
from onnxq.bits import allocation as mixed_bits
from onnxq.bits import sizes
from onnxq.calibration import calibrate
from onnxq.calibration.bias_correction import (
    RunningChannelMean,
    conv_output_shift,
    corrected_bias,
    gemm_output_shift,
)
from onnxq.calibration.statistics import TensorStatistics
from onnxq.config import QuantConfig, WeightMethod, config_to_dict
from onnxq.data import CalibrationSet, open_calibration
from onnxq.emit import emit, emit_options
from onnxq.passes import INT4_MIN_OPSET, QDQ_MIN_OPSET, prepare
from onnxq.passes.annotate import annotate, excluded_nodes
from onnxq.passes.op_table import gemm_weight_axis
from onnxq.passes.smooth import SmoothMatMulInputsPass, smoothing_candidates
from onnxq.plan import BiasQuant, QuantPlan, WeightQuant
from onnxq.qparams import QParams, WeightParams, weight_params_for
from onnxq.report.card import card_paths, write_card
from onnxq.scoring.fidelity import FidelityReport, verify
from onnxq.weights.comq import ComqSettings
from onnxq.weights.search_comq import comq_layers, comq_weight_params, gram_observers

logger = logging.getLogger(__name__)

# Called as progress(stage, advance, total): stage names are "smooth" and "calibrate".
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class QuantResult:
    """A verified quantized model and everything that explains it."""

    model: onnx.ModelProto
    plan: QuantPlan
    qparams: QParams
    config: QuantConfig
    fidelity: FidelityReport
    calibration_feeds: int
    float_bytes: int
    quantized_bytes: int
    comq_layers: frozenset[str] = frozenset()
    seconds: dict[str, float] = field(default_factory=dict)
    source: str | None = None
    allocation: mixed_bits.AllocationReport | None = None

    def save(self, path: str | Path, card: bool = True) -> Path:
        """Write the model atomically, and its quantization card beside it (OUT.card.json and
        OUT.card.md); refuses to write over the source model."""
        path = model_io.check_output_path(self.source, path)
        for card_path in card_paths(path) if card else ():
            model_io.check_output_path(self.source, card_path)
        model_io.save_model_atomic(self.model, path)
        if card:
            write_card(self, path)
        return path

    def layer_bytes(self) -> dict[str, int]:
        """Bytes on disk of each quantized layer (codes, scales, zero points, bias), measured on
        the written model."""
        return sizes.layer_bytes(self.model, self.plan)

    def summary(self) -> dict[str, object]:
        """A JSON-ready account of what was done and how well it went."""
        quantized_ops = Counter(self.plan.quantized_nodes.values())
        float_ops = Counter(self.plan.float_nodes.values())
        float_reasons = Counter(self.plan.float_reasons.values())
        return {
            "config": config_to_dict(self.config),
            "quantized_ops": dict(sorted(quantized_ops.items())),
            "float_ops": dict(sorted(float_ops.items())),
            "float_reasons": dict(sorted(float_reasons.items())),
            "weights_quantized": len(self.plan.weights),
            "activation_groups": len(self.plan.activation_groups),
            "calibration_feeds": self.calibration_feeds,
            "fidelity": {"feeds": self.fidelity.feeds, "held_out": self.fidelity.held_out,
                         "outputs": [dataclasses.asdict(o) for o in self.fidelity.outputs]},
            "float_bytes": self.float_bytes,
            "quantized_bytes": self.quantized_bytes,
            "size_ratio": self.quantized_bytes / self.float_bytes if self.float_bytes else None,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "weight_bits": dict(sorted(Counter(spec.grid.bits for spec in self.plan.weights).items())),
            "allocation": None if self.allocation is None else {
                "budget": self.allocation.budget, "limit": self.allocation.limit,
                "used": self.allocation.used, "average_bits": self.allocation.average_bits},
        }


def _as_proto(model: str | Path | onnx.ModelProto | ir.Model) -> tuple[onnx.ModelProto, str | None]:
    if isinstance(model, (str, Path)):
        return model_io.load_model(model), str(model)
    if isinstance(model, ir.Model):
        proto = model_io.to_proto(model)
    elif isinstance(model, onnx.ModelProto):
        proto = model
    else:
        raise TypeError(f"model must be a path, onnx.ModelProto or onnx_ir.Model, not {type(model)}")
    model_io.check_model(proto, "the model")
    return proto, None


def _weights(model: ir.Model, plan: QuantPlan) -> dict[str, np.ndarray]:
    initializers = model.graph.initializers
    return {spec.tensor: initializers[spec.tensor].const_value.numpy() for spec in plan.weights}


def quantize(
    model: str | Path | onnx.ModelProto | ir.Model,
    calib: object,
    config: QuantConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> QuantResult:
    """Quantize a float model to int8 QDQ with calibration data.

    Args:
        model: path of an ONNX file, an `onnx.ModelProto` or an `onnx_ir.Model`.
        calib: a `.npz` path (samples on axis 0), a folder of `.npz` feeds, or any iterable of
            feed dicts {input name: array}.
        config: options; defaults to `QuantConfig()`.
        progress: optional callback (stage, advance, total) for progress display.
    """
    config = config or QuantConfig()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    proto, source = _as_proto(model)
    float_session = model_io.create_session(proto, "the float model")
    feeds = open_calibration(calib, proto)
    if config.max_feeds is not None and len(feeds) > config.max_feeds:
        feeds = feeds.subset(range(config.max_feeds))
    calibration, held_out = feeds.split(config.holdout, np.random.default_rng(config.seed))
    opset = INT4_MIN_OPSET if config.lowest_weight_bits <= 4 else QDQ_MIN_OPSET
    prepared = prepare(model_io.to_ir(proto), opset)
    if config.smooth:
        _smooth(prepared, calibration, config, progress)
    plan = annotate(prepared, config)
    seconds["prepare"] = time.perf_counter() - start

    start = time.perf_counter()
    correctable = _correctable_biases(prepared, plan) if config.bias_correction else {}
    stats = {name: TensorStatistics(keep_histogram=calibrate.needs_histogram(config.method))
             for name in plan.stats_tensors}
    input_means = {spec.activation: RunningChannelMean(axis) for spec, axis in correctable.items()}
    comq_targets = (comq_layers(prepared, plan.weights)
                    if config.weight_method is WeightMethod.COMQ else {})
    grams = gram_observers(comq_targets)
    observers: dict[str, list[calibrate.Observer]] = {}
    for name, observer in [*stats.items(), *input_means.items(),
                           *((comq_targets[s].inputs[0].name, g) for s, g in grams.items())]:
        observers.setdefault(name, []).append(observer)
    calibrate.observe(model_io.to_proto(prepared), observers, calibration,
                      _stage(progress, "calibrate", len(calibration)))
    grams_by_node = {spec.node: gram for spec, gram in grams.items()}
    activations = calibrate.activation_qparams(plan, stats, config)
    allocation = None
    if config.allocation_budget is not None:
        seconds["calibrate"] = time.perf_counter() - start
        start = time.perf_counter()
        plan, weights, allocation = _allocate(prepared, plan, config, calibration, held_out,
                                              float_session, activations, grams_by_node,
                                              correctable, input_means, proto.ByteSize(), progress)
        seconds["allocate"] = time.perf_counter() - start
        start = time.perf_counter()
    else:
        weights = _weight_params(prepared, plan, grams_by_node)
    qparams = QParams(activations=activations, weights=weights)
    qparams.bias_values = _corrected_biases(prepared, plan, qparams, correctable, input_means)
    if comq_targets and config.comq_sequential:
        qparams.weights.update(_sequential_comq(prepared, plan, qparams, comq_targets, calibration,
                                                _stage(progress, "comq inputs", len(calibration))))
        qparams.bias_values = _corrected_biases(prepared, plan, qparams, correctable, input_means)
    seconds.setdefault("calibrate", 0.0)
    seconds["calibrate"] += time.perf_counter() - start

    start = time.perf_counter()
    quantized = model_io.to_proto(emit(prepared, plan, qparams, emit_options(config)))
    fidelity_feeds: CalibrationSet = held_out if len(held_out) else calibration
    _, fidelity = verify(quantized, float_session, fidelity_feeds, held_out=len(held_out) > 0,
                         min_cosine=config.min_cosine)
    seconds["verify"] = time.perf_counter() - start
    return QuantResult(
        model=quantized, plan=plan, qparams=qparams, config=config, fidelity=fidelity,
        calibration_feeds=len(calibration), float_bytes=proto.ByteSize(),
        quantized_bytes=quantized.ByteSize(), seconds=seconds, source=source, allocation=allocation,
        comq_layers=frozenset(spec.node for spec in comq_targets))


def _weight_params(prepared: ir.Model, plan: QuantPlan,
                   grams_by_node: dict[str, object]) -> dict[WeightQuant, WeightParams]:
    """Round to nearest for every weight; COMQ's codes where a Gram matrix was collected."""
    params = weight_params_for(plan, _weights(prepared, plan))
    targets = comq_layers(prepared, [spec for spec in plan.weights if spec.node in grams_by_node])
    params.update(comq_weight_params(targets, {spec: grams_by_node[spec.node] for spec in targets},
                                     ComqSettings()))
    return params


def _allocate(prepared: ir.Model, plan: QuantPlan, config: QuantConfig, calibration: CalibrationSet,
              held_out: CalibrationSet, float_session, activations: dict,
              grams_by_node: dict[str, object], correctable: dict[BiasQuant, int],
              input_means: dict[str, RunningChannelMean], float_bytes: int,
              progress: ProgressCallback | None):
    """Mixed bits: every free layer's parameters at each candidate bit-width, their measured
    sensitivity, and the knapsack's choice under the budget (onnxq.bits.allocation)."""
    free = [spec.node for spec in plan.weights if spec.node not in plan.bits_rules]
    free_plan = dataclasses.replace(plan, weights=[s for s in plan.weights if s.node in free])
    fixed_plan = dataclasses.replace(plan, weights=[s for s in plan.weights if s.node not in free])
    # Layers fixed by a rule are searched once, at their bits; free layers at every bit-width
    # the allocation can give them or the probes and size estimate start from.
    fixed = {spec.node: params
             for spec, params in _weight_params(prepared, fixed_plan, grams_by_node).items()}
    bit_widths = set(config.candidate_bits) | {config.weight_bits}
    if config.sensitivity_base == "quantized":
        bit_widths.add(8)
    by_bits = {bits: {spec.node: params for spec, params in
                      _weight_params(prepared, free_plan.with_weight_bits(dict.fromkeys(free, bits)),
                                     grams_by_node).items()}
               for bits in sorted(bit_widths)}

    def weights_for(bits_plan: QuantPlan) -> dict[WeightQuant, WeightParams]:
        return {spec: fixed[spec.node] if spec.node in fixed else by_bits[spec.grid.bits][spec.node]
                for spec in bits_plan.weights}
    specs = {spec.node: spec for spec in plan.weights}
    nodes = {node.name: node for node in prepared.graph}
    biases = {spec.node: spec for spec in correctable}
    layout = emit_options(config)

    def values(layer: str, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
        params = by_bits[bits][layer]
        bias = None
        if layer in biases:
            bias = _corrected_bias(nodes[layer], specs[layer], params, biases[layer],
                                   input_means[biases[layer].activation])
        return params.dequantized(specs[layer].axis), bias

    def qparams_for(bits_plan: QuantPlan) -> QParams:
        qparams = QParams(activations=activations, weights=weights_for(bits_plan))
        qparams.bias_values = _corrected_biases(prepared, bits_plan, qparams, correctable, input_means)
        return qparams

    def fidelity_of(bits: dict[str, int]) -> float:
        bits_plan = plan.with_weight_bits(bits)
        quantized = model_io.to_proto(emit(prepared, bits_plan, qparams_for(bits_plan), layout))
        _, fidelity = verify(quantized, float_session, held_out, held_out=True, min_cosine=None)
        return fidelity.worst_cosine

    def float_values(layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        inputs = nodes[layer].inputs
        bias = inputs[biases[layer].input_index].const_value.numpy() if layer in biases else None
        return inputs[specs[layer].input_index].const_value.numpy(), bias

    if config.sensitivity_base == "float":
        base = mixed_bits.ProbeBase(prepared, float_values)
    else:
        at_8 = plan.with_weight_bits(dict.fromkeys(free, 8))
        base = mixed_bits.ProbeBase(emit(prepared, at_8, qparams_for(at_8)), lambda layer: values(layer, 8),
                                    float_session)
    quantized_bytes = 0
    if config.allocation_budget in ("max_size_mb", "max_size_ratio"):
        quantized_bytes = model_io.to_proto(emit(prepared, plan, qparams_for(plan), layout)).ByteSize()
    report = mixed_bits.allocate_bits(
        prepared, plan, config, calibration, values, base, quantized_bytes, float_bytes, layout,
        fidelity_of if len(held_out) else None, _stage(progress, "sensitivity", len(free)))
    plan = plan.with_weight_bits(report.bits)
    return plan, weights_for(plan), report


def _sequential_comq(prepared: ir.Model, plan: QuantPlan, qparams: QParams,
                     targets: dict, calibration: CalibrationSet, progress) -> dict:
    """COMQ again, on the inputs each layer sees in the quantized model (earlier layers'
    weights and all activations quantized) rather than the float inputs."""
    quantized = emit(prepared, plan, qparams)  # DQ layout: every layer keeps its node
    nodes = {node.name: node for node in quantized.graph}
    grams = gram_observers(targets)
    observers: dict[str, list[calibrate.Observer]] = {}
    for spec, gram in grams.items():
        observers.setdefault(nodes[spec.node].inputs[0].name, []).append(gram)
    calibrate.observe(model_io.to_proto(quantized), observers, calibration, progress)
    return comq_weight_params(targets, grams, ComqSettings())


def _correctable_biases(model: ir.Model, plan: QuantPlan) -> dict[BiasQuant, int]:
    """Biases of Conv and Gemm nodes that bias correction can adjust, with the channel axis of
    their input (1 for NCHW Conv input, last for a Gemm's (N, K) input)."""
    nodes = {node.name: node for node in model.graph}
    return {spec: (1 if nodes[spec.node].op_type == "Conv" else -1) for spec in plan.biases
            if nodes[spec.node].op_type in ("Conv", "Gemm")}


def _corrected_biases(model: ir.Model, plan: QuantPlan, qparams: QParams,
                      correctable: dict[BiasQuant, int],
                      input_means: dict[str, RunningChannelMean]) -> dict[BiasQuant, np.ndarray]:
    """b - (W_q - W) E[x] for every correctable bias (see onnxq.calibration.bias_correction)."""
    nodes = {node.name: node for node in model.graph}
    weight_specs = {spec.node: spec for spec in plan.weights}
    return {spec: _corrected_bias(nodes[spec.node], weight_specs[spec.node],
                                  qparams.weights[weight_specs[spec.node]], spec,
                                  input_means[spec.activation])
            for spec in correctable}


def _corrected_bias(node: ir.Node, weight_spec: WeightQuant, params: WeightParams, spec: BiasQuant,
                    input_mean: RunningChannelMean) -> np.ndarray:
    weight = node.inputs[weight_spec.input_index].const_value.numpy()
    error = params.dequantized(weight_spec.axis) - weight
    if node.op_type == "Conv":
        group = node.attributes["group"].as_int() if "group" in node.attributes else 1
        shift = conv_output_shift(error, input_mean.mean, group)
    else:
        shift = gemm_output_shift(error, input_mean.mean, trans_b=gemm_weight_axis(node) == 0)
    return corrected_bias(node.inputs[spec.input_index].const_value.numpy(), shift)


def _smooth(model: ir.Model, calibration: CalibrationSet, config: QuantConfig,
            progress: ProgressCallback | None = None) -> None:
    """SmoothQuant on the inputs of weight MatMuls, from their per-channel ranges."""
    skip = frozenset(excluded_nodes(model.graph, config.exclude))
    candidates = smoothing_candidates(model, skip)
    if candidates:
        absmax = calibrate.collect_channel_absmax(model_io.to_proto(model), candidates, calibration,
                                                  _stage(progress, "smooth", len(calibration)))
        SmoothMatMulInputsPass(absmax, config.effective_smooth_alpha, skip)(model)


def _stage(progress: ProgressCallback | None, stage: str, total: int):
    if progress is None:
        return None
    progress(stage, 0, total)
    return lambda advance: progress(stage, advance, total)
