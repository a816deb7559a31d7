"""Sequential COMQ: float targets, waves of independent layers, and the stage on the bundled
digit CNN through ONNX Runtime (its real calibration data)."""

import dataclasses
import functools
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import onnxq
from graphs import small_cnn, tiny_attention
from onnxq import model_io
from onnxq.calibration.calibrate import expose_values
from onnxq.config import ComqConfig, QuantConfig, WeightMethod
from onnxq.emit import emit
from onnxq.errors import ConfigError
from onnxq.scoring.sessions import open_session
from onnxq.stages.bias import BiasCorrection
from onnxq.stages.prepare import load_state, prepare_state
from onnxq.stages.ranges import ActivationRanges
from onnxq.stages.sequential_comq import SequentialComq, _downstream, _paired_grams, layer_waves
from onnxq.stages.weights import WeightSearch
from onnxq.state import run_stages
from onnxq.weights.float_targets import float_target_rows
from onnxq.weights.gram import weight_rows
from onnxq.weights.search_comq import comq_weight_params

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "bundled"


def _digits(bits: int, **options):
    config = QuantConfig(weight_bits=bits, weight_method=WeightMethod.COMQ, **options)
    return BUNDLED / "digit_cnn.onnx", BUNDLED / "digit_cnn_calib.npz", config


@functools.cache
def _first_pass_once(bits: int):
    """`_first_pass`, shared by the tests that only read it."""
    return _first_pass(bits)


def _first_pass(bits: int):
    """The digit CNN through calibration, COMQ on float inputs and bias correction, and every
    COMQ layer's inputs in that quantized model paired with the float model's."""
    state = load_state(*_digits(bits))
    prepare_state(state)
    run_stages(state, [ActivationRanges(), WeightSearch(), BiasCorrection()])
    layers = state.weights.targets
    return state, layers, _paired_grams(state, dict(layers))


def _paired_error(rows, quantized_rows, gram):
    """||X_q q - X w||^2 without its constant ||X w||^2: q^T H q - 2 q^T C w, summed over rows."""
    return float(np.sum((quantized_rows @ gram.hessian) * quantized_rows)
                 - 2 * np.sum((quantized_rows @ gram.cross) * rows))


def _rows_of(spec, node, params_or_weight, gram):
    group = gram.geometry.group if gram.geometry is not None else 1
    weight = params_or_weight if isinstance(params_or_weight, np.ndarray) else \
        params_or_weight.dequantized(spec.axis)
    return weight_rows(node, weight, group).astype(np.float64)


def test_float_target_is_the_weight_when_the_inputs_agree():
    _, layers, grams = _first_pass_once(4)
    for spec, node in layers.items():
        gram = grams[spec]
        rows = _rows_of(spec, node, node.inputs[spec.input_index].const_value.numpy(), gram)
        for ridge in (0.01, 1.0, 100.0):
            target = float_target_rows(rows, gram.hessian, gram.hessian, ridge)  # C = H: X_q = X
            np.testing.assert_allclose(target, rows, rtol=1e-6, atol=1e-6 * np.abs(rows).max())


def test_float_targets_and_their_codes_come_closer_to_the_float_outputs():
    """On the quantized model's real inputs: the ridge target never does worse than the float
    weight (it minimizes the error plus a penalty that is 0 at w), and COMQ toward the targets
    lowers the error of COMQ toward the weights in every layer."""
    state, layers, grams = _first_pass_once(4)
    for spec, node in layers.items():
        gram = grams[spec]
        rows = _rows_of(spec, node, node.inputs[spec.input_index].const_value.numpy(), gram)
        target = float_target_rows(rows, gram.hessian, gram.cross, 0.1)
        assert _paired_error(rows, target, gram) <= _paired_error(rows, rows, gram), spec.node
        again = comq_weight_params({spec: node}, {spec: gram}, state.config.comq, {spec: target})[spec]
        first = state.qparams.weights[spec]
        assert _paired_error(rows, _rows_of(spec, node, again, gram), gram) < \
            _paired_error(rows, _rows_of(spec, node, first, gram), gram), spec.node


def test_paired_inputs_differ_and_their_shapes_must_match():
    _, _, grams = _first_pass_once(4)
    for gram in grams.values():
        assert gram.cross.shape == gram.hessian.shape
        assert not np.allclose(gram.cross, gram.hessian)  # quantized inputs are not the float ones
    any_gram = next(iter(grams.values()))
    with pytest.raises(ValueError, match="differ in shape"):
        any_gram.update_pair(np.zeros((1, 1, 28, 28), np.float32), np.zeros((1, 1, 14, 14), np.float32))


def test_waves_keep_dependent_layers_apart():
    attention = ir.from_proto(tiny_attention())
    assert layer_waves(attention.graph, ["q_proj", "k_proj"]) == [["q_proj", "k_proj"]]
    cnn = ir.from_proto(small_cnn())
    convs = [node.name for node in cnn.graph if node.op_type in ("Conv", "Gemm")]
    assert layer_waves(cnn.graph, convs) == [[name] for name in convs]


def test_waves_of_a_real_model_never_hold_a_layer_and_its_reader():
    model = model_io.to_ir(model_io.load_model(BUNDLED / "digit_cnn.onnx"))
    layers = [node.name for node in model.graph if node.op_type in ("Conv", "Gemm")]
    waves = layer_waves(model.graph, layers)
    assert [name for wave in waves for name in wave] == layers
    nodes = {node.name: node for node in model.graph}
    for wave in waves:
        for name in wave:
            assert not set(wave) & _downstream(nodes[name])


def _layer_output_means(model: ir.Model, layers: list[str], feeds) -> dict[str, np.ndarray]:
    nodes = {node.name: node for node in model.graph}
    names = [nodes[name].outputs[0].name for name in layers]
    session = open_session(expose_values(model, names), "a model")
    outputs = [session.run(names, feed) for feed in feeds]
    return {layer: np.mean([out[i] for out in outputs], axis=(0, 1)) for i, layer in enumerate(layers)}


def test_every_gemm_output_keeps_the_float_mean_on_the_calibration_feeds():
    """After the stage, a layer's inputs no longer change, and its bias absorbed the mean shift:
    each Gemm's output mean over the calibration feeds, run through ORT, is the float model's
    (up to the int32 bias rounding), much closer than after COMQ on float inputs."""
    state, layers, _ = _first_pass(3)
    gemms = [spec.node for spec in layers if state.index.node(spec.node).op_type == "Gemm"]
    reference = _layer_output_means(state.model, gemms, state.calibration)
    first = _layer_output_means(emit(state.model, state.plan, state.qparams), gemms, state.calibration)
    run_stages(state, [SequentialComq()])
    again = _layer_output_means(emit(state.model, state.plan, state.qparams), gemms, state.calibration)
    for layer in gemms:
        now, before = (np.abs(means[layer] - reference[layer]).max() for means in (again, first))
        assert now < 1e-3 * np.abs(reference[layer]).max(), layer
        assert now < 0.1 * before, layer


def test_the_stage_writes_a_model_close_to_float():
    model, calib, config = _digits(3)
    result = onnxq.quantize(model, calib, dataclasses.replace(config, comq_sequential=True))
    assert "sequential comq" in result.seconds
    assert result.fidelity.outputs[0].cosine > 0.999


def test_the_ridge_must_be_positive():
    with pytest.raises(ConfigError, match="float_target_ridge"):
        ComqConfig(float_target_ridge=0.0)
    with pytest.raises(ValueError, match="ridge"):
        float_target_rows(np.ones((1, 1, 2)), np.eye(2)[None], np.eye(2)[None], 0.0)


def test_at_eight_bits_the_stage_leaves_the_model_as_one_pass_writes_it():
    model, calib, config = _digits(8)
    sequential = onnxq.quantize(model, calib, config)
    one_pass = onnxq.quantize(model, calib, dataclasses.replace(config, comq_sequential=False))
    assert sequential.model.SerializeToString() == one_pass.model.SerializeToString()


def test_allocated_bits_are_searched_again_at_their_allocated_grids():
    """With a mean-bits budget the allocator changes bits after planning; the stage takes the
    final plan's layers, and each keeps codes on its own grid."""
    model, calib, config = _digits(8, avg_bits=4.0, candidate_bits=(4, 8), max_feeds=24)
    result = onnxq.quantize(model, calib, config)
    one_pass = onnxq.quantize(model, calib, dataclasses.replace(config, comq_sequential=False))
    assert any(spec.grid.bits < 8 for spec in result.plan.weights)
    changed = 0
    for spec in result.plan.weights:
        codes = result.qparams.weights[spec].codes
        assert spec.grid.qmin <= codes.min() and codes.max() <= spec.grid.qmax, spec.node
        changed += not np.array_equal(codes, one_pass.qparams.weights[spec].codes)
    assert changed >= 1


def test_dynamic_layers_keep_their_first_search():
    """A Gemm with dynamic activations quantizes its input inside its kernel: the stage leaves
    it as COMQ's first search wrote it and searches the static Convs again."""
    model, calib, config = _digits(4, activations="dynamic", layer_bits=("Gemm=8",), max_feeds=24)
    result = onnxq.quantize(model, calib, config)
    one_pass = onnxq.quantize(model, calib, dataclasses.replace(config, comq_sequential=False))
    assert result.plan.dynamic_layers
    for spec in result.plan.weights:
        same = np.array_equal(result.qparams.weights[spec].codes, one_pass.qparams.weights[spec].codes)
        assert same == (spec.node in result.plan.dynamic_layers), spec.node
