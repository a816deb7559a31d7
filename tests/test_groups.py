"""Group-wise weight scales (`PerGroup`, `--group-size`): round trips through ORT for Conv,
Gemm, MatMul and Gather against numpy (odd sizes, the last group partial), COMQ per group
against round to nearest per group on COMQ's objective, predicted bytes against written
bytes, and the config / CLI errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tomllib
from onnx import TensorProto, helper, numpy_helper

import graphs
import onnxq
from onnxq import model_io
from onnxq.bits.sizes import layer_bytes, predicted_layer_bytes, tensor_bytes
from onnxq.config import ComqConfig, ConfigError, PerGroup, QuantConfig, WeightMethod, config_from_dict
from onnxq.emit import EmitOptions, emit, emit_options
from onnxq.numerics import IntRange
from onnxq.passes import INT4_MIN_OPSET, prepare
from onnxq.plan import QuantPlan, WeightQuant
from onnxq.qparams import QParams, WeightParams, round_to_nearest_weight
from onnxq.report.card import quantization_card
from onnxq.report.compare import WeightSource, rank_layers
from onnxq.weights.comq import damped, reconstruction_error
from onnxq.weights.comq_groups import comq_groups


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray], optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _one_node_model(op: str, weight: np.ndarray, x_shape, y_shape, x_type=TensorProto.FLOAT,
                    **attributes) -> onnx.ModelProto:
    inputs = ["w", "x"] if op == "Gather" else ["x", "w"]
    node = helper.make_node(op, inputs, ["y"], name="layer", **attributes)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", x_type, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _reference_dequantized(params: WeightParams, spec: WeightQuant) -> np.ndarray:
    """(c - z) * s element by element, the group of element j of a grouped row being j // g."""
    codes = params.codes.astype(np.float64)
    view = codes.reshape(codes.shape[0], -1) if codes.ndim > 2 else codes
    view = view if spec.block_axis == 1 else view.T
    scale = params.scale if spec.block_axis == 1 else params.scale.T
    zero = params.zero_point if spec.block_axis == 1 else params.zero_point.T
    out = np.empty_like(view)
    for row in range(view.shape[0]):
        for j in range(view.shape[1]):
            group = j // spec.group_size
            out[row, j] = (view[row, j] - float(zero[row, group])) * float(scale[row, group])
    out = out if spec.block_axis == 1 else out.T
    return out.reshape(codes.shape)


def _asymmetric(params: WeightParams, spec: WeightQuant, rng) -> WeightParams:
    """The same scales with random zero points and codes re-rounded around them."""
    zero = rng.integers(max(-2, spec.grid.qmin), min(2, spec.grid.qmax) + 1,
                        params.scale.shape).astype(spec.grid.dtype)
    weight = params.dequantized(spec.axis) + 0.3 * params.dequantized(spec.axis).std()
    codes = onnxq.numerics.quantize_groups(weight, params.scale, zero, spec.grid, spec.block_axis,
                                           spec.group_size)
    return WeightParams(params.scale, zero, codes, spec.group_size, spec.block_axis)


CASES = {
    # name: (op, weight shape, x shape, y shape, output-channel axis, reduction axis, attributes)
    "conv": ("Conv", (5, 7, 3, 3), (1, 7, 6, 6), (1, 5, 4, 4), 0, 1, {}),
    "gemm_transb": ("Gemm", (5, 37), (3, 37), (3, 5), 0, 1, {"transB": 1}),
    "gemm": ("Gemm", (37, 5), (3, 37), (3, 5), 1, 0, {}),
    "matmul": ("MatMul", (45, 6), (2, 3, 45), (2, 3, 6), 1, 0, {}),
    "gather": ("Gather", (11, 40), (2, 3), (2, 3, 40), 0, 1, {}),
}


def _case(name: str, bits: int, group: int, seed: int = 0):
    op, shape, x_shape, y_shape, axis, block_axis, attributes = CASES[name]
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.3, shape).astype(np.float32)
    x_type = TensorProto.INT64 if op == "Gather" else TensorProto.FLOAT
    model = _one_node_model(op, weight, x_shape, y_shape, x_type, **attributes)
    spec = WeightQuant("w", "layer", 0 if op == "Gather" else 1, axis, IntRange(bits, True),
                       block_axis, group, group)
    feed = ({"x": rng.integers(0, shape[0], x_shape).astype(np.int64)} if op == "Gather"
            else {"x": rng.normal(0, 1, x_shape).astype(np.float32)})
    return model, weight, spec, feed


def _reference_output(model: onnx.ModelProto, weight: np.ndarray, feed) -> np.ndarray:
    """The float model run with `weight` in place of its own (float kernels, no quantization)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight.astype(np.float32), "w"))
    return _run(model, feed, optimize=False)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize(("bits", "group", "asymmetric"),
                         [(4, 16, False), (4, 24, False), (3, 16, True), (8, 16, False),
                          (2, 16, False), (2, 16, True), (2, 24, True)])
def test_grouped_round_trip_through_ort(name, bits, group, asymmetric):
    model, weight, spec, feed = _case(name, bits, group)
    if asymmetric:
        spec = WeightQuant(**{**spec.__dict__, "asymmetric": True})
    params = round_to_nearest_weight(weight, spec)
    if asymmetric:
        params = _asymmetric(params, spec, np.random.default_rng(1))
    expected = _reference_dequantized(params, spec)
    np.testing.assert_allclose(params.dequantized(spec.axis), expected, rtol=1e-6, atol=1e-7)
    plan = QuantPlan(weights=[spec])
    qparams = QParams(weights={spec: params})
    reference = _reference_output(model, expected, feed)
    for options in (EmitOptions(), EmitOptions(matmul_nbits=True, nbits_accuracy_level=0)):
        emitted = model_io.to_proto(emit(model_io.to_ir(model), plan, qparams, options))
        onnx.checker.check_model(emitted)
        ops = {node.op_type for node in emitted.graph.node}
        kernel = {"MatMul": "MatMulNBits", "Gather": "GatherBlockQuantized"}.get(CASES[name][0])
        # 8-bit tables too are GatherBlockQuantized (bits=8); 8-bit MatMuls are DQ containers
        low_bits = bits < 8 or kernel == "GatherBlockQuantized"
        if kernel and low_bits and group == 16 and (kernel != "MatMulNBits" or options.matmul_nbits):
            assert kernel in ops, ops
        else:
            assert "DequantizeLinear" in ops
        if bits == 2 and kernel is None:  # Conv / Gemm: int2 codes, reshaped behind the DQ
            codes = next(t for t in emitted.graph.initializer if t.name == "w_q")
            assert codes.data_type == TensorProto.INT2 and "Reshape" in ops
        for optimize in (False, True):
            np.testing.assert_allclose(_run(emitted, feed, optimize), reference, rtol=1e-4, atol=1e-4)


def test_group_scales_follow_the_group_maximum():
    """Round to nearest per group: s = max |w| / qmax over each group (the last one partial)."""
    _, weight, spec, _ = _case("matmul", 4, 16)  # K = 45: groups of 16, 16, 13
    params = round_to_nearest_weight(weight, spec)
    assert params.scale.shape == (3, 6)
    for group, rows in enumerate((slice(0, 16), slice(16, 32), slice(32, 45))):
        np.testing.assert_allclose(params.scale[group], np.abs(weight[rows]).max(axis=0) / 7, rtol=1e-6)
    error = np.abs(params.dequantized(spec.axis) - weight)
    assert np.all(error <= params.scale.repeat(16, axis=0)[:45] / 2 + 1e-6)


def _layer(rng, rows: int, d_in: int, samples: int = 120):
    x = rng.normal(size=(samples, d_in)) @ rng.normal(size=(d_in, d_in))
    return rng.normal(size=(rows, d_in)), x.T @ x


@pytest.mark.parametrize(("bits", "group", "symmetric"),
                         [(4, 16, True), (4, 24, False), (3, 32, True), (2, 16, False)])
def test_comq_per_group_never_worse_than_rtn_per_group(bits, group, symmetric):
    rng = np.random.default_rng(bits * group)
    weight, hessian = _layer(rng, 9, 75)
    grid = IntRange(bits, True)
    settings = ComqConfig(sweeps=2)
    result = comq_groups(weight, hessian, grid, symmetric, group, settings)
    assert result.scale.shape == (9, -(-75 // group))  # the last group partial
    assert all(b <= a * (1 + 1e-9) for a, b in zip(result.errors, result.errors[1:], strict=False))
    objective = damped(hessian[None], settings.damping)[0]
    spec = WeightQuant("w", "n", 1, 0, grid, 1, group)
    rtn = round_to_nearest_weight(weight.astype(np.float32), spec).dequantized(0).astype(np.float64)
    ours = reconstruction_error(weight, result.dequantized(), objective)
    theirs = reconstruction_error(weight, rtn, objective)
    assert np.all(ours <= theirs * (1 + 1e-6))  # row by row
    assert ours.sum() < 0.9 * theirs.sum()
    assert result.codes.min() >= grid.qmin and result.codes.max() <= grid.qmax


def _quantized(model, feeds, **settings):
    config = QuantConfig(holdout=2, **settings)
    result = onnxq.quantize(model, feeds, config)
    prepared = prepare(model_io.to_ir(model), INT4_MIN_OPSET)
    return result, prepared, config


def _mlp(seed: int = 0) -> onnx.ModelProto:
    """x (.., 45) -> MatMul (45, 40) -> Relu -> MatMul (40, 6): rows of 45 and 40 inputs."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 45])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", 6])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (45, 40)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(0, 0.3, (40, 6)).astype(np.float32), "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize(("group", "method", "nbits", "bits"), [(16, WeightMethod.RTN, True, 4),
                                                                (24, WeightMethod.COMQ, True, 4),
                                                                (16, WeightMethod.COMQ, True, 4),
                                                                (16, WeightMethod.COMQ, False, 4),
                                                                (16, WeightMethod.RTN, True, 2),
                                                                (16, WeightMethod.COMQ, True, 2),
                                                                (24, WeightMethod.COMQ, True, 2),
                                                                (0, WeightMethod.COMQ, True, 2),
                                                                (0, WeightMethod.COMQ, True, 3)])
def test_predicted_bytes_equal_written_bytes(group, method, nbits, bits):
    """Every layout: blocked DQ (int4, Conv reshaped; int2 behind a Reshape at 2 bits),
    MatMulNBits (bits=4, bits=2) with and without zero points, per group and per channel (0),
    the DQ fallback of a group size MatMulNBits does not run (24)."""
    mlp_feeds = [{"x": np.random.default_rng(i).normal(0, 1, (1, 5, 45)).astype(np.float32)}
                 for i in range(12)]
    for model, model_feeds in ((graphs.small_cnn(), graphs.small_cnn_feeds(10)), (_mlp(), mlp_feeds)):
        result, prepared, config = _quantized(
            model, model_feeds, weight_bits=bits, weight_group_size=group, weight_method=method,
            matmul_nbits=nbits, smooth=False, comq=ComqConfig(asymmetric_ops=("Conv", "Gemm", "MatMul")))
        options = emit_options(config)
        emitted = emit(prepared, result.plan, result.qparams, options)
        measured = layer_bytes(emitted, result.plan)
        predicted = predicted_layer_bytes(prepared, result.plan, options)
        assert {name: measured[name] for name in predicted} == predicted
        assert sum(measured.values()) == sum(tensor_bytes(v) for v in emitted.graph.initializers.values())
        assert layer_bytes(result.model, result.plan) == measured  # as written
        nbits_nodes = [node for node in result.model.graph.node if node.op_type == "MatMulNBits"]
        assert len(nbits_nodes) == (2 if nbits and group in (0, 16) and model.graph.name == "mlp" else 0)
        # COMQ's MatMul rows are asymmetric here: MatMulNBits gets zero points
        assert all(len(node.input) == (4 if method is WeightMethod.COMQ else 3) for node in nbits_nodes)
        assert all(next(a.i for a in node.attribute if a.name == "bits") == (2 if bits == 2 else 4)
                   for node in nbits_nodes)


def test_cnn_card_and_fidelity_per_group():
    feeds = graphs.small_cnn_feeds(12)
    result, _, _ = _quantized(graphs.small_cnn(), feeds, weight_bits=4, weight_group_size=16,
                              weight_method=WeightMethod.COMQ)
    layers = {layer["layer"]: layer for layer in quantization_card(result)["layers"]}
    assert layers["conv2"]["granularity"] == "per_group(16)"  # 8 * 3 * 3 = 72 per row
    assert layers["conv1"]["granularity"] == "per_group(16)"  # 3 * 3 * 3 = 27 per row
    assert layers["fc"]["granularity"].startswith("per_channel")  # 8 inputs: one group
    per_channel, _, _ = _quantized(graphs.small_cnn(), feeds, weight_bits=4, weight_group_size=0,
                                   weight_method=WeightMethod.COMQ)
    assert result.fidelity.outputs[0].cosine >= per_channel.fidelity.outputs[0].cosine - 1e-3


def test_eight_bit_weights_stay_per_channel_unless_per_group():
    feeds = graphs.small_cnn_feeds(10)
    default, _, _ = _quantized(graphs.small_cnn(), feeds, weight_bits=8, weight_group_size=16)
    assert all(spec.group_size == 0 for spec in default.plan.weights)
    grouped, _, _ = _quantized(graphs.small_cnn(), feeds, weight_bits=8,
                               weight_granularity=PerGroup(16))
    assert {spec.node: spec.group_size for spec in grouped.plan.weights} == {
        "conv1": 16, "conv2": 16, "fc": 0}


@pytest.mark.parametrize(("values", "message"), [
    ({"weight_group_size": 1}, "group size must be an integer >= 2"),
    ({"weight_group_size": -4}, "group size must be an integer >= 2"),
    ({"weight_group_size": "x"}, "group size must be an integer >= 2"),
    ({"weight_granularity": "per_group(1)"}, "group size must be an integer >= 2"),
    ({"weight_granularity": "per_group(a)"}, "group size must be an integer >= 2"),
])
def test_bad_group_sizes_in_config(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(values)


def test_group_size_round_trips_through_toml():
    config = QuantConfig(weight_group_size=64, weight_granularity=PerGroup(128))
    text = onnxq.dump_config(config)
    assert 'weight_granularity = "per_group(128)"' in text and "weight_group_size = 64" in text
    assert config_from_dict(tomllib.loads(text)) == config


@pytest.mark.parametrize("value", ["1", "-3", "abc", "2.5"])
def test_bad_group_size_on_the_command_line_is_one_line(tmp_path, value):
    model = tmp_path / "cnn.onnx"
    onnx.save(graphs.small_cnn(), model)
    run = subprocess.run([sys.executable, "-m", "onnxq", "quantize", str(model),
                          str(tmp_path / "out.onnx"), "--weight-bits", "4", "--group-size", value],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: error:"), run.stderr
    assert "group size must be an integer >= 2" in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_compare_per_layer_reads_grouped_weights(tmp_path):
    """`onnxq compare --per-layer` finds the grouped Conv and Gemm weights (a Conv's behind its
    Reshape) and restores them from the float model; restoring every point gives float back."""
    feeds = graphs.small_cnn_feeds(12)
    float_path, quant_path = tmp_path / "cnn.onnx", tmp_path / "cnn.w4.onnx"
    onnx.save(graphs.small_cnn(), float_path)
    config = QuantConfig(weight_bits=4, weight_group_size=16, holdout=2)
    result = onnxq.quantize(float_path, feeds, config)
    result.save(quant_path)
    assert "Reshape" in {node.op_type for node in onnx.load(quant_path).graph.node}
    layers = {layer.node: layer for layer in rank_layers(float_path, quant_path, feeds[:4])}
    assert {"conv1", "conv2", "fc"} <= set(layers)
    for name in ("conv1", "conv2"):
        assert layers[name].weights is WeightSource.FLOAT
        assert 1 in layers[name].quantized_inputs
        assert layers[name].damage > 0


def test_fast_conv_storage_keeps_codes_per_channel_in_int8_for_qlinearconv():
    """`conv_storage = "fast"`: 4-bit Conv codes per channel, symmetric, in an int8 container,
    which ORT fuses into QLinearConv (compact: int4 + DQ + float Conv); bytes as predicted."""
    from onnxq.report.kernels import optimized_op_counts

    feeds = graphs.small_cnn_feeds(12)
    settings = {"weight_bits": 4, "weight_method": WeightMethod.COMQ, "measure_latency": False,
                "short_row_bits": 0}
    compact, _, _ = _quantized(graphs.small_cnn(), feeds, **settings)
    fast, prepared, config = _quantized(graphs.small_cnn(), feeds, conv_storage="fast", **settings)
    convs = [spec for spec in fast.plan.weights if spec.node.startswith("conv")]
    assert convs and all(spec.group_size == 0 and spec.symmetric for spec in convs)
    for spec in convs:
        params = fast.qparams.weights[spec]
        assert params.codes.min() >= -8 and params.codes.max() <= 7 and not np.any(params.zero_point)
    assert optimized_op_counts(fast.model).get("QLinearConv") == 2
    assert not optimized_op_counts(compact.model).get("QLinearConv")
    codes = {init.name: init.data_type for init in fast.model.graph.initializer}
    assert codes["w2_q"] == TensorProto.INT8
    options = emit_options(config)
    predicted = predicted_layer_bytes(prepared, fast.plan, options)
    measured = layer_bytes(fast.model, fast.plan)
    assert {name: measured[name] for name in predicted} == predicted


def test_rows_no_longer_than_a_group_keep_short_row_bits():
    """At weight_bits 4 and group size 64, the small CNN's conv1 (rows of 27) and fc (rows of 8)
    stay at 8 bits, conv2 (rows of 72) goes to 4; the card says why. short_row_bits = 0 keeps
    all at 4; with an allocation budget the allocator decides, and no default is applied."""
    feeds = graphs.small_cnn_feeds(12)
    result, _, _ = _quantized(graphs.small_cnn(), feeds, weight_bits=4, measure_latency=False)
    bits = {spec.node: spec.grid.bits for spec in result.plan.weights}
    assert bits == {"conv1": 8, "conv2": 4, "fc": 8}
    layers = {layer["layer"]: layer for layer in quantization_card(result)["layers"]}
    assert layers["conv1"]["bits_from"] == "short_row_bits: rows of 27 weights, no longer than one group (64)"
    assert layers["conv2"]["bits_from"] == "weight_bits"
    every, _, _ = _quantized(graphs.small_cnn(), feeds, weight_bits=4, short_row_bits=0,
                             measure_latency=False)
    assert {spec.grid.bits for spec in every.plan.weights} == {4}
    per_channel, _, _ = _quantized(graphs.small_cnn(), feeds, weight_bits=4, weight_group_size=0,
                                   measure_latency=False)
    assert {spec.grid.bits for spec in per_channel.plan.weights} == {4}  # no groups, no short rows
    allocated, _, _ = _quantized(graphs.small_cnn(), feeds, avg_bits=4.0, candidate_bits=(4, 8),
                                 measure_latency=False)
    assert not allocated.plan.bits_defaults


@pytest.mark.parametrize("value", [1, 5, "8", True])
def test_bad_short_row_bits_is_one_line(value):
    with pytest.raises(ConfigError, match=r"^short_row_bits must be 0, 2, 3, 4 or 8, got"):
        QuantConfig(short_row_bits=value)
