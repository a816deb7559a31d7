"""Layers with float activations (weight-only layers): the emit round trip through ONNX Runtime
against numpy, the float candidates of `activations = auto`, and what the card says."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import numpy_helper
from test_dynamic import dense_model

import onnxq
from onnxq import model_io
from onnxq.config import ActivationMode, QuantConfig
from onnxq.emit import emit, emit_options
from onnxq.passes import prepare
from onnxq.report.kernels import optimized_op_counts
from onnxq.scoring.sessions import SessionSettings, open_session
from onnxq.stages.activation_modes import FLOAT_SHARE, candidate_layers, float_layers


def _run(model, x: np.ndarray, optimized: bool = True) -> np.ndarray:
    levels = ort.GraphOptimizationLevel
    level = levels.ORT_ENABLE_ALL if optimized else levels.ORT_DISABLE_ALL
    return open_session(model, "the model", SessionSettings(optimization=level)).run(None, {"x": x})[0]


def _feeds(count: int, seed: int = 1, outliers: bool = False) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        x = rng.normal(0, 1, (1, 5, 16)).astype(np.float32)
        if outliers:  # one huge value per feed: a static input scale rounds the rest to nothing
            x[0, rng.integers(5), rng.integers(16)] = 300.0
        feeds.append({"x": x})
    return feeds


def _uint8(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    codes = np.clip(np.round(x / scale) + zero_point, 0, 255)
    return ((codes - zero_point) * scale).astype(np.float32)


def test_float_layer_reads_the_float_input_and_keeps_its_codes():
    """fc1 with float activations: it reads x itself (no Q/DQ in front), its weight stays int8
    codes behind a DequantizeLinear and its bias float; fc2 stays static. ORT's outputs equal
    numpy's x @ W1_hat + b1 -> Relu -> static uint8 rounding -> @ W2_hat."""
    model = dense_model()
    result = onnxq.quantize(model, _feeds(12), QuantConfig(smooth=False, bias_correction=False))
    plan = result.plan.with_float_activations({"fc1": "test"})
    prepared = prepare(model_io.to_ir(model))
    written = model_io.to_proto(emit(prepared, plan, result.qparams, emit_options(result.config)))
    nodes = {node.name: node for node in written.graph.node}
    assert nodes["fc1"].input[0] == "x"
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    weight = nodes[nodes["fc1"].input[1]] if nodes["fc1"].input[1] not in inits else None
    assert weight is not None and weight.op_type == "DequantizeLinear"
    assert inits[weight.input[0]].dtype == np.int8
    assert not any(node.op_type == "QuantizeLinear" and node.input[0] == "x" for node in written.graph.node)

    def dequantized(layer: str) -> np.ndarray:
        spec = result.plan.weight_of(layer)
        return result.qparams.weights[spec].dequantized(spec.axis)

    b1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b1"))
    group = result.plan.group_of("r")
    params = result.qparams.activations[group.stats_tensor]
    x = np.random.default_rng(9).normal(0, 1, (2, 5, 16)).astype(np.float32)
    hidden = np.maximum(x @ dequantized("fc1") + b1, 0)
    want = _uint8(hidden, float(params.scale), int(params.zero_point)) @ dequantized("fc2")
    np.testing.assert_allclose(_run(written, x, optimized=False), want, rtol=0,
                               atol=1e-4 * float(np.abs(want).max()))
    # ORT 1.32 fuses DQ(int8) -> MatMul on a float input into MatMulNBits (bits 8), which
    # rounds its input to int8 per block at run time (accuracy level 4): close, not exact.
    counts = optimized_op_counts(written)
    assert counts.get("MatMulNBits", 0) + counts.get("MatMul", 0) == 1, counts
    np.testing.assert_allclose(_run(written, x), want, rtol=0, atol=0.05 * float(np.abs(want).max()))
    # the file is no larger: fc1's codes are still int8, and nothing else is added
    assert len(written.SerializeToString()) <= len(result.model.SerializeToString()) + 64


def test_float_candidates_are_the_layers_that_carry_a_share_of_the_damage():
    static = 1.0
    alone = {"a": 0.5, "b": 1.0 - FLOAT_SHARE / 2, "c": 0.7, "d": 1.2}
    assert float_layers(alone, static) == ["a", "c"]
    layers = candidate_layers(["m1", "m2"], ["m1"], ["a", "m1"])
    assert layers == {"static": ([], []), "dynamic": (["m1", "m2"], []), "mixed": (["m1"], []),
                      "float_top": ([], ["a"]), "float": ([], ["a", "m1"]),
                      "mixed_float": ([], ["a", "m1"])}
    assert candidate_layers(["m1"], [], []) == {"static": ([], []), "dynamic": (["m1"], [])}
    assert candidate_layers(["m1"], ["m1"], ["a"])["dynamic_float"] == (["m1"], ["a"])


def test_auto_leaves_a_layer_float_when_its_input_rounding_costs_most():
    """x's first channel is 100x the others (an outlier channel; SmoothQuant, which would
    move it into the weights, is off): one uint8 scale for x rounds the other 15 channels to a
    few codes. fc1 alone float removes most of the damage. With latency out of the way (a wide
    slack) auto writes fc1 with float inputs and says why."""
    model = dense_model()
    outlier_channel = np.ones(16, np.float32)
    outlier_channel[0] = 100.0
    feeds = [{"x": feed["x"] * outlier_channel} for feed in _feeds(20)]
    config = QuantConfig(activations=ActivationMode.AUTO, mode_feeds=8, mode_latency_slack=100.0,
                         smooth=False)
    result = onnxq.quantize(model, feeds, config)
    report = result.modes
    assert set(report.alone_float) == {"fc1", "fc2"}
    assert report.alone_float["fc1"] < (1 - FLOAT_SHARE) * report.static_damage
    assert result.plan.activation_mode("fc1") == "float", report.why
    assert report.chosen in ("float_top", "float", "mixed_float", "dynamic_float")
    assert report.candidates[report.chosen] <= (1 - FLOAT_SHARE) * report.candidates["static"]
    from onnxq.report.card import quantization_card
    layers = {layer["layer"]: layer for layer in quantization_card(result)["layers"]}
    assert layers["fc1"]["activations"] == "float"
    assert layers["fc1"]["activations_from"].startswith(f"auto: {report.chosen} model chosen")
    assert "alone float" in layers["fc1"]["activations_from"]
    assert result.summary()["activations"]["layers"]["float"] >= 1
    producers = {output: node.op_type for node in result.model.graph.node for output in node.output}
    fc1 = next(node for node in result.model.graph.node if node.name == "fc1")
    assert producers.get(fc1.input[0]) != "DequantizeLinear"
    # the held-out fidelity shows it too: better than the same run all static
    static = onnxq.quantize(model, feeds, QuantConfig(smooth=False))
    assert result.fidelity.outputs[0].cosine > static.fidelity.outputs[0].cosine
