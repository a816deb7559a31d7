"""Emitting sub-8-bit weights: mixed per-layer bits run in ORT with the expected kernels,
MatMulNBits computes what DequantizeLinear -> MatMul of the same codes computes, and the
predicted layer sizes equal the measured ones."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
import onnxq
from onnxq import model_io
from onnxq.bits.sizes import (
    ACTIVATION_QPARAMS,
    layer_bytes,
    predicted_layer_bytes,
    tensor_bytes,
    unquantized_bytes,
)
from onnxq.config import QuantConfig
from onnxq.emit import EmitOptions, emit, emit_options
from onnxq.numerics import IntRange
from onnxq.passes import INT4_MIN_OPSET, prepare
from onnxq.plan import QuantPlan, WeightQuant
from onnxq.qparams import QParams, WeightParams, weight_params_for
from onnxq.report.kernels import optimized_op_counts

ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
NONE = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def _run(model: onnx.ModelProto, feeds, level=ALL, nbits_level: str | None = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if nbits_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", nbits_level)
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0] for feed in feeds]


def _matmul_model(k: int, n: int, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.3, (k, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph(
        [node], "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "T", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "T", n])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return model, weight


def _weight_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Consumer node name -> data type of the weight codes it reads through a DQ (biases,
    int32, left out)."""
    initializers = {t.name: t.data_type for t in model.graph.initializer}
    codes = {node.output[0]: initializers[node.input[0]] for node in model.graph.node
             if node.op_type == "DequantizeLinear" and node.input[0] in initializers
             and initializers[node.input[0]] != TensorProto.INT32}
    return {node.name: codes[name] for node in model.graph.node for name in node.input
            if name in codes}


@pytest.mark.parametrize(("k", "n", "bits"), [(48, 24, 4), (100, 12, 3), (16, 8, 2)])
def test_matmul_nbits_equals_dequantize_matmul(k, n, bits):
    model, weight = _matmul_model(k, n, seed=k)
    spec = WeightQuant("w", "mm", 1, 1, IntRange(bits, signed=True))
    plan = QuantPlan(weights=[spec])
    qparams = QParams(weights=weight_params_for(plan, {"w": weight}))
    prepared = model_io.to_ir(model)
    reference = model_io.to_proto(emit(prepared, plan, qparams))
    exact = model_io.to_proto(emit(prepared, plan, qparams,
                                   EmitOptions(matmul_nbits=True, nbits_accuracy_level=0)))
    fast = model_io.to_proto(emit(prepared, plan, qparams,
                                  EmitOptions(matmul_nbits=True, nbits_accuracy_level=4)))
    assert [node.op_type for node in exact.graph.node] == ["MatMulNBits"]
    feeds = [{"x": np.random.default_rng(i).normal(0, 1, (2, 5, k)).astype(np.float32)}
             for i in range(3)]
    expected = _run(reference, feeds, NONE)
    numpy_reference = [feed["x"] @ qparams.weights[spec].dequantized(1) for feed in feeds]
    for want, ours, ref, approx in zip(expected, _run(exact, feeds), numpy_reference,
                                       _run(fast, feeds), strict=True):
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(want, ref, rtol=1e-5, atol=1e-5)
        # accuracy level 4 quantizes the activation to int8 per block inside the kernel
        assert np.abs(approx - want).max() <= 0.02 * np.abs(want).max()
    assert optimized_op_counts(exact).get("MatMulNBits") == 1


def _attention_plan(config: QuantConfig):
    """plan, qparams and the prepared model of tiny_attention under `config`."""
    model = graphs.tiny_attention()
    result = onnxq.quantize(model, graphs.tiny_attention_feeds(12), config)
    prepared = prepare(model_io.to_ir(model), INT4_MIN_OPSET)
    return result, prepared


@pytest.mark.parametrize("activation_qdq", [True, False])
def test_matmul_nbits_in_quantized_graph(activation_qdq):
    config = QuantConfig(short_row_bits=0, weight_bits=4, layer_bits=("k_proj=8",), smooth=False, holdout=2)
    result, prepared = _attention_plan(config)
    options = EmitOptions(matmul_nbits=True, nbits_accuracy_level=0,
                          nbits_activation_qdq=activation_qdq)
    dq_model = model_io.to_proto(emit(prepared, result.plan, result.qparams))
    nbits_model = model_io.to_proto(emit(prepared, result.plan, result.qparams, options))
    ops = [node.op_type for node in nbits_model.graph.node]
    assert ops.count("MatMulNBits") == 1  # q_proj (4 bits); k_proj stays int8 QDQ
    nbits_node = next(node for node in nbits_model.graph.node if node.op_type == "MatMulNBits")
    assert nbits_node.name == "q_proj"
    producer = {o: node for node in nbits_model.graph.node for o in node.output}
    assert (nbits_node.input[0] in producer
            and producer[nbits_node.input[0]].op_type == "DequantizeLinear") == activation_qdq
    feeds = graphs.tiny_attention_feeds(3)
    counts = optimized_op_counts(nbits_model)
    assert counts.get("MatMulNBits") == 1
    if activation_qdq:  # the same float product as DQ -> MatMul
        for a, b in zip(_run(dq_model, feeds, NONE), _run(nbits_model, feeds, NONE), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    else:
        for a, b in zip(_run(dq_model, feeds, NONE), _run(nbits_model, feeds, NONE), strict=True):
            assert onnxq.numerics.cosine(a, b) > 0.99


def test_mixed_bits_cnn_kernels():
    config = QuantConfig(weight_bits=4, layer_bits=("conv1=8", "fc=3"), holdout=2, weight_group_size=0)
    feeds = graphs.small_cnn_feeds(10)
    result = onnxq.quantize(graphs.small_cnn(), feeds, config)
    model = result.model
    bits = {spec.node: spec.grid.bits for spec in result.plan.weights}
    assert bits == {"conv1": 8, "conv2": 4, "fc": 3}
    dtypes = _weight_dtypes(model)
    assert dtypes == {"conv1": TensorProto.INT8, "conv2": TensorProto.INT4,
                      "fc": TensorProto.INT4}
    counts = optimized_op_counts(model)
    assert counts.get("QLinearConv") == 1  # conv1 in int8; conv2 as DQ(int4) -> Conv
    assert counts.get("Conv") == 1 and counts.get("Gemm") == 1
    # the fused graph computes what the unfused one does
    for a, b in zip(_run(model, feeds[:3], NONE), _run(model, feeds[:3], ALL), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_mixed_bits_attention_runs():
    config = QuantConfig(weight_bits=8, layer_bits=("q_proj=2", "k_proj=3"), holdout=2,
                         matmul_nbits=False)
    result = onnxq.quantize(graphs.tiny_attention(), graphs.tiny_attention_feeds(12), config)
    assert _weight_dtypes(result.model) == {"q_proj": TensorProto.INT4,
                                            "k_proj": TensorProto.INT4}
    feeds = graphs.tiny_attention_feeds(3)
    for a, b in zip(_run(result.model, feeds, NONE),
                    _run(result.model, feeds, ALL, nbits_level="0"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("matmul_nbits", [False, True])
def test_sizes_predicted_equal_measured_attention(matmul_nbits):
    config = QuantConfig(short_row_bits=0, weight_bits=4, layer_bits=("k_proj=8",), smooth=False, holdout=2,
                         matmul_nbits=matmul_nbits)
    result, prepared = _attention_plan(config)
    options = emit_options(config)
    emitted = emit(prepared, result.plan, result.qparams, options)
    measured = layer_bytes(emitted, result.plan)
    predicted = predicted_layer_bytes(prepared, result.plan, options)
    assert {name: measured[name] for name in predicted} == predicted
    # 16x16 weights: 4-bit codes are 128 bytes, 8-bit 256
    if not matmul_nbits:
        assert predicted["q_proj"] == 128 + 16 * 4 + 8
    assert predicted["k_proj"] == 256 + 16 * 4 + 16
    total = sum(tensor_bytes(v) for v in emitted.graph.initializers.values())
    assert sum(measured.values()) == total
    assert ACTIVATION_QPARAMS in measured


def test_sizes_predicted_equal_measured_cnn():
    config = QuantConfig(weight_bits=4, layer_bits=("conv1=8", "fc=2"), holdout=2, weight_group_size=0)
    feeds = graphs.small_cnn_feeds(10)
    model = graphs.small_cnn()
    result = onnxq.quantize(model, feeds, config)
    prepared = prepare(model_io.to_ir(model), INT4_MIN_OPSET)
    measured = layer_bytes(result.model, result.plan)
    predicted = predicted_layer_bytes(prepared, result.plan)
    assert {name: measured[name] for name in predicted} == predicted
    # conv2: 8*8*3*3 int4 codes, 8 scales, 8 int4 zero points, 8 int32 bias + 8 bias scales
    assert predicted["conv2"] == 288 + 32 + 4 + 32 + 32
    assert sum(measured.values()) == sum(
        tensor_bytes(v) for v in ir.from_proto(result.model).graph.initializers.values())
    assert unquantized_bytes(prepared, result.plan) == sum(
        size for name, size in measured.items() if name not in predicted)


def _gather_model(rows: int, row: int, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 0.5, (rows, row)).astype(np.float32)
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=0)
    graph = helper.make_graph(
        [node], "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", row])],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return model, table


@pytest.mark.parametrize(("rows", "row", "bits", "signed", "seven_bit"),
                         [(50, 48, 4, True, False), (33, 64, 2, True, False), (20, 32, 4, False, False),
                          (20, 24, 3, True, False), (50, 48, 8, True, False), (20, 64, 8, False, False),
                          (20, 24, 8, True, False), (40, 32, 8, True, True)])
def test_gather_block_quantized_equals_dequantize_gather(rows, row, bits, signed, seven_bit):
    """A table as GatherBlockQuantized (bits=4 up to 4 bits, bits=8 above; 7-bit codes of
    reduce_range in the 8-bit layout) gathers what DQ -> Gather and numpy give, to the bit."""
    model, table = _gather_model(rows, row, seed=row)
    grid = IntRange(bits, signed, seven_bit)
    spec = WeightQuant("table", "embed", 0, 0, grid)
    plan = QuantPlan(weights=[spec])
    if signed:
        qparams = QParams(weights=weight_params_for(plan, {"table": table}))
    else:  # asymmetric rows: per-row zero points, emitted as a zero_points input
        rng = np.random.default_rng(rows)
        qparams = QParams(weights={spec: WeightParams(
            rng.uniform(0.01, 0.1, rows).astype(np.float32),
            rng.integers(0, 2 ** bits, rows).astype(np.uint8),
            rng.integers(0, 2 ** bits, (rows, row)).astype(np.uint8))})
    prepared = model_io.to_ir(model)
    blocks = model_io.to_proto(emit(prepared, plan, qparams))
    reference = model_io.to_proto(emit(prepared, plan, qparams,
                                       EmitOptions(gather_block_quantized=False)))
    ops = [node.op_type for node in blocks.graph.node]
    assert ops == (["Gather", "DequantizeLinear"][::-1] if row % 16 else ["GatherBlockQuantized"])
    ids = [{"ids": np.array([[0, rows - 1, 3, 3, -1]], np.int64)}]
    (got,), (want,) = _run(blocks, ids), _run(reference, ids, NONE)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        want[0], qparams.weights[spec].dequantized(0)[ids[0]["ids"][0]])
    measured = layer_bytes(blocks, plan)["embed"]
    assert measured == predicted_layer_bytes(prepared, plan)["embed"]


def _two_bit_params(k: int, n: int, group: int, asymmetric: bool,
                    seed: int) -> tuple[WeightQuant, WeightParams]:
    """Random 2-bit codes, scales and (where asymmetric) zero points of a (K, N) MatMul weight,
    per channel (group 0) or per group of `group` along K."""
    rng = np.random.default_rng(seed)
    grid = IntRange(2, signed=True)
    spec = WeightQuant("w", "mm", 1, 1, grid, block_axis=0, low_bit_group_size=group,
                       int8_group_size=group, asymmetric=asymmetric)
    scale_shape = (-(-k // group), n) if group else (n,)
    zero_point = (rng.integers(grid.qmin, grid.qmax + 1, scale_shape) if asymmetric
                  else np.zeros(scale_shape, np.int64)).astype(np.int8)
    codes = rng.integers(grid.qmin, grid.qmax + 1, (k, n)).astype(np.int8)
    scale = rng.uniform(0.05, 0.5, scale_shape).astype(np.float32)
    return spec, WeightParams(scale, zero_point, codes, group, 0 if group else None)


@pytest.mark.parametrize(("k", "n", "group", "asymmetric"),
                         [(64, 8, 0, False), (37, 5, 0, False), (37, 5, 0, True),
                          (100, 6, 16, False), (100, 6, 32, True), (129, 3, 64, True)])
def test_matmul_nbits_2bit_against_numpy(k, n, group, asymmetric):
    """2-bit weights as MatMulNBits bits=2 (four codes per byte, zero points four per byte
    where asymmetric): ORT with all optimizations computes x @ ((c - z) * s) for odd K, a
    partial last block, per channel and per group; the bytes written are the predicted ones."""
    model, _ = _matmul_model(k, n, seed=k)
    spec, params = _two_bit_params(k, n, group, asymmetric, seed=k + n)
    plan = QuantPlan(weights=[spec])
    qparams = QParams(weights={spec: params})
    prepared = model_io.to_ir(model)
    options = EmitOptions(matmul_nbits=True, nbits_accuracy_level=0)
    emitted = emit(prepared, plan, qparams, options)
    exact = model_io.to_proto(emitted)
    (node,) = exact.graph.node
    attributes = {a.name: a.i for a in node.attribute}
    assert node.op_type == "MatMulNBits" and attributes["bits"] == 2
    block = attributes["block_size"]
    assert block == (group or block)
    packed = {t.name: t for t in exact.graph.initializer}
    blocks = -(-k // block)
    assert tuple(packed[node.input[1]].dims) == (n, blocks, block // 4)
    assert len(node.input) == (4 if asymmetric else 3)
    if asymmetric:  # N rows of ceil(blocks / 4) bytes
        assert tuple(packed[node.input[3]].dims) == (n * -(-blocks // 4),)
    feeds = [{"x": np.random.default_rng(i).normal(0, 1, (2, 5, k)).astype(np.float32)}
             for i in range(2)]
    fast = model_io.to_proto(emit(prepared, plan, qparams,
                                  EmitOptions(matmul_nbits=True, nbits_accuracy_level=4)))
    for feed, ours, approx in zip(feeds, _run(exact, feeds), _run(fast, feeds), strict=True):
        want = feed["x"].astype(np.float64) @ params.dequantized(1)
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
        assert np.abs(approx - want).max() <= 0.02 * np.abs(want).max()
    measured = layer_bytes(emitted, plan)["mm"]
    assert measured == predicted_layer_bytes(prepared, plan, options)["mm"]
    assert measured == n * blocks * (block // 4 + 4) + (n * -(-blocks // 4) if asymmetric else 0)


@pytest.mark.parametrize("group", [0, 16])
def test_two_bit_cnn_int2_containers(group):
    """2-bit Conv and Gemm codes as int2 (opset 25) behind a Reshape: ORT with all
    optimizations loads the model (the int2 DQ straight into the layer would be fused into a
    QLinearConv / QGemm that does not load) and computes what the unoptimized graph does; each
    layer is smaller than in int4 by what the prediction says, and written as predicted."""
    config = QuantConfig(short_row_bits=0, weight_bits=2, holdout=2, weight_group_size=group)
    feeds = graphs.small_cnn_feeds(10)
    model = graphs.small_cnn()
    result = onnxq.quantize(model, feeds, config)
    written = result.model
    assert next(o.version for o in written.opset_import if o.domain == "") >= 25
    codes = {t.name: t.data_type for t in written.graph.initializer
             if t.name.endswith("_q") and t.data_type != TensorProto.INT32}
    assert len(codes) == 3 and set(codes.values()) == {TensorProto.INT2}
    reshaped = {node.input[0] for node in written.graph.node if node.op_type == "Reshape"}
    assert len(reshaped) == 3  # every weight DQ feeds its layer through a Reshape
    for a, b in zip(_run(written, feeds[:3], NONE), _run(written, feeds[:3], ALL), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    prepared = prepare(model_io.to_ir(model), INT4_MIN_OPSET)
    options = emit_options(config)
    measured = layer_bytes(written, result.plan)
    predicted = predicted_layer_bytes(prepared, result.plan, options)
    assert {name: measured[name] for name in predicted} == predicted
    int4 = EmitOptions(int2=False)
    as_int4 = layer_bytes(emit(prepared, result.plan, result.qparams, int4), result.plan)
    assert {name: as_int4[name] for name in predicted} == predicted_layer_bytes(
        prepared, result.plan, int4)
    int4_codes = {"conv1": 108, "conv2": 288, "fc": 40}  # 216, 576 and 80 codes
    for spec in result.plan.weights:  # half the codes, less the Reshape's shape (8 per dim)
        rank = 2 if spec.node == "fc" else 4
        assert as_int4[spec.node] - measured[spec.node] >= int4_codes[spec.node] // 2 - 8 * rank


def test_two_bit_attention_matmul_nbits():
    """2-bit MatMul weights in a quantized graph: MatMulNBits with bits=2, written as predicted,
    half the code bytes of the same weights at 4 bits."""
    sizes = {}
    for bits in (4, 2):
        config = QuantConfig(short_row_bits=0, weight_bits=bits, smooth=False, holdout=2,
                             weight_group_size=16)
        result, prepared = _attention_plan(config)
        options = emit_options(config)
        emitted = model_io.to_proto(emit(prepared, result.plan, result.qparams, options))
        nodes = [node for node in emitted.graph.node if node.op_type == "MatMulNBits"]
        assert [next(a.i for a in node.attribute if a.name == "bits") for node in nodes] == [bits] * 2
        measured = layer_bytes(emitted, result.plan)
        assert {name: measured[name] for name in ("q_proj", "k_proj")} == predicted_layer_bytes(
            prepared, result.plan, options)
        sizes[bits] = measured["q_proj"]
        feeds = graphs.tiny_attention_feeds(2)
        for a, b in zip(_run(emitted, feeds, NONE), _run(emitted, feeds, ALL, "0"), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # 16 x 16, one block of 16 per column: 16 * (8 + 4) at 4 bits, 16 * (4 + 4) at 2
    assert (sizes[4], sizes[2]) == (16 * 12, 16 * 8)
