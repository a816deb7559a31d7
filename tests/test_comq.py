"""COMQ: the numeric core against brute force, monotone steps, and real layers through ORT."""

import itertools
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from graphs import small_cnn, small_cnn_feeds
from onnxq import model_io
from onnxq.calibrate import observe
from onnxq.comq import ComqSettings, best_rounded_start, comq, reconstruction_error
from onnxq.config import WeightMethod
from onnxq.data import open_calibration
from onnxq.gram import ConvGeometry, conv_patches, weight_rows
from onnxq.numerics import IntRange
from onnxq.passes import prepare
from onnxq.passes.annotate import annotate
from onnxq.search_comq import comq_layers, gram_observers


def _layer(rng, d_in, d_out=1, samples=60):
    x = rng.normal(size=(samples, d_in)) @ rng.normal(size=(d_in, d_in))
    return rng.normal(size=(d_out, d_in)), x.T @ x


def test_reaches_brute_force_optimum_on_tiny_layers():
    """At COMQ's final scale, 3-bit codes of 4-input rows: most rows reach the optimum exactly;
    coordinate descent can stop in a local minimum on the others (stated gap: mean < 30%)."""
    rng = np.random.default_rng(0)
    grid = IntRange(3, signed=True)
    gaps = []
    for _ in range(30):
        weight, hessian = _layer(rng, 4)
        result = comq(weight, hessian, grid, symmetric=True, settings=ComqSettings(sweeps=4))
        scale = float(result.scale[0])
        best = min(reconstruction_error(weight, np.array(codes)[None] * scale, hessian)[0]
                   for codes in itertools.product(range(grid.qmin, grid.qmax + 1), repeat=4))
        gaps.append(reconstruction_error(weight, result.dequantized(), hessian)[0] / best - 1)
    assert np.mean(np.array(gaps) < 1e-9) >= 0.6
    assert np.mean(gaps) < 0.3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("update_scales", [True, False])
def test_every_step_never_increases_the_error(bits, update_scales):
    rng = np.random.default_rng(bits)
    weight, hessian = _layer(rng, 48, d_out=16, samples=200)
    result = comq(weight, hessian, IntRange(bits, True), True,
                  ComqSettings(sweeps=3, update_scales=update_scales))
    errors = np.array(result.errors)
    assert np.all(np.diff(errors) <= 1e-9 * errors[0])
    assert errors[-1] < errors[0]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_beats_round_to_nearest_and_searched_scale(bits):
    rng = np.random.default_rng(10 + bits)
    weight, hessian = _layer(rng, 64, d_out=32, samples=300)
    grid = IntRange(bits, True)
    minmax = comq(weight, hessian, grid, True, ComqSettings(sweeps=0, scale_candidates=(1.0,)))
    searched = comq(weight, hessian, grid, True, ComqSettings(sweeps=0))
    full = comq(weight, hessian, grid, True)
    assert full.errors[-1] <= searched.errors[0] <= minmax.errors[0]
    assert full.errors[-1] < 0.9 * minmax.errors[0]
    assert np.all(full.codes >= grid.qmin) and np.all(full.codes <= grid.qmax)


def test_block_size_does_not_change_the_result():
    rng = np.random.default_rng(3)
    weight, hessian = _layer(rng, 40, d_out=8, samples=100)
    a = comq(weight, hessian, IntRange(4, True), True, ComqSettings(block=7))
    b = comq(weight, hessian, IntRange(4, True), True, ComqSettings(block=128))
    np.testing.assert_array_equal(a.codes, b.codes)


def test_best_rounded_start_is_the_minmax_rounding_at_fraction_one():
    rng = np.random.default_rng(4)
    weight, hessian = _layer(rng, 8, d_out=4)
    scale, zero, codes = best_rounded_start(weight, hessian, IntRange(4, True), True, (1.0,))
    np.testing.assert_allclose(scale, np.abs(weight).max(axis=1) / 7)
    np.testing.assert_array_equal(codes, np.round(weight / scale[:, None]))


@pytest.mark.parametrize("group, pads, strides, dilations", [
    (1, [1, 1, 1, 1], [1, 1], [1, 1]), (4, [0, 1, 2, 1], [2, 1], [1, 1]), (8, [2, 2, 2, 2], [1, 2], [2, 2])])
def test_conv_patches_times_weight_rows_is_the_conv(group, pads, strides, dilations):
    rng = np.random.default_rng(group)
    x = rng.normal(size=(2, 8, 9, 10)).astype(np.float32)
    weight = rng.normal(size=(8, 8 // group, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=pads, strides=strides,
                            dilations=dilations)
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    ir_node = next(iter(ir.from_proto(model).graph))
    patches = conv_patches(x, ConvGeometry.of(ir_node, weight.shape))
    rows = weight.reshape(group, 8 // group, -1)
    out = np.concatenate([patches[g] @ rows[g].T for g in range(group)], axis=1)  # (N*oh*ow, O)
    np.testing.assert_allclose(out.reshape(2, *expected.shape[2:], 8).transpose(0, 3, 1, 2), expected,
                               rtol=1e-4, atol=1e-4)


def test_emitted_model_carries_comq_codes_exactly():
    result = onnxq.quantize(small_cnn(), small_cnn_feeds(24),
                            onnxq.QuantConfig(weight_bits=4, weight_method=WeightMethod.COMQ))
    model = ir.from_proto(result.model)
    nodes = {node.name: node for node in model.graph}
    assert model.opset_imports[""] >= 21
    for spec, params in result.qparams.weights.items():
        dequantize = nodes[spec.node].inputs[spec.input_index].producer()
        stored = dequantize.inputs[0].const_value
        assert stored.dtype == ir.DataType.INT4
        np.testing.assert_array_equal(stored.numpy().astype(np.int64), params.codes.astype(np.int64))
        # DequantizeLinear of the written weight is the searcher's Q
        session = ort.InferenceSession(_dequantize_model(dequantize).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, {})[0]
        np.testing.assert_allclose(got, params.dequantized(spec.axis), rtol=1e-6)


def _dequantize_model(dequantize: ir.Node):
    inputs = [numpy_helper.from_array(np.asarray(v.const_value.numpy()), v.name)
              for v in dequantize.inputs[1:]]
    codes = ir.serde.serialize_tensor(dequantize.inputs[0].const_value)
    attrs = {"axis": dequantize.attributes["axis"].as_int()} if "axis" in dequantize.attributes else {}
    node = helper.make_node("DequantizeLinear", [codes.name] + [t.name for t in inputs], ["w"], **attrs)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
                              [codes, *inputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_real_layers_beat_round_to_nearest_and_the_searched_scale(bits):
    """Every weight layer of the bundled digit CNN, H from its real calibration inputs."""
    root = Path(__file__).resolve().parents[1] / "models" / "bundled"
    proto = model_io.load_model(root / "digit_cnn.onnx")
    model = prepare(model_io.to_ir(proto))
    plan = annotate(model, onnxq.QuantConfig(weight_bits=bits))
    layers = comq_layers(model, plan.weights)
    grams = gram_observers(layers)
    feeds = open_calibration(root / "digit_cnn_calib.npz", proto).subset(range(16))
    observe(model_io.to_proto(model), {layers[s].inputs[0].name: [g] for s, g in grams.items()}, feeds)
    grid = IntRange(bits, True)
    for spec, node in layers.items():
        gram = grams[spec]
        group = gram.geometry.group if gram.geometry else 1
        rows = weight_rows(node, node.inputs[1].const_value.numpy(), group)
        minmax = comq(rows, gram.hessian, grid, True, ComqSettings(sweeps=0, scale_candidates=(1.0,)))
        searched = comq(rows, gram.hessian, grid, True, ComqSettings(sweeps=0))
        full = comq(rows, gram.hessian, grid, True)
        assert full.errors[-1] <= searched.errors[0] <= minmax.errors[0], spec.node
        assert full.errors[-1] < minmax.errors[0], spec.node
