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


def _attention_feeds(count: int):
    return [{"x": np.random.default_rng(i).normal(0, 1, (1, 6, 16)).astype(np.float32)}
            for i in range(count)]


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
    result = onnxq.quantize(model, _attention_feeds(12), config)
    prepared = prepare(model_io.to_ir(model), INT4_MIN_OPSET)
    return result, prepared


@pytest.mark.parametrize("activation_qdq", [True, False])
def test_matmul_nbits_in_quantized_graph(activation_qdq):
    config = QuantConfig(weight_bits=4, layer_bits=("k_proj=8",), smooth=False, holdout=2)
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
    feeds = _attention_feeds(3)
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
    result = onnxq.quantize(graphs.tiny_attention(), _attention_feeds(12), config)
    assert _weight_dtypes(result.model) == {"q_proj": TensorProto.INT4,
                                            "k_proj": TensorProto.INT4}
    feeds = _attention_feeds(3)
    for a, b in zip(_run(result.model, feeds, NONE),
                    _run(result.model, feeds, ALL, nbits_level="0"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("matmul_nbits", [False, True])
def test_sizes_predicted_equal_measured_attention(matmul_nbits):
    config = QuantConfig(weight_bits=4, layer_bits=("k_proj=8",), smooth=False, holdout=2,
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
