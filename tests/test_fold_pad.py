"""Pads in front of Conv / pooling: folded in float exactly, the rest run on codes; either way
no float Pad is left between a DequantizeLinear and a QuantizeLinear in ORT's graph."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from graphs import padded_cnn
from onnxq.config import QuantConfig
from onnxq.passes import prepare
from onnxq.passes.fold_pad import FoldPadPass
from onnxq.passes.insert_qdq import InsertQDQPass
from onnxq.report.kernels import float_islands, op_counts, optimized_graph

RNG_FEEDS = np.random.default_rng(7)
FEEDS = [{"x": RNG_FEEDS.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(12)]
CONFIG = QuantConfig(holdout=2, equalize=False, smooth=False)


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _pads_left(model: ir.Model) -> list[str]:
    return [node.name for node in model.graph if node.op_type == "Pad"]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("pool", ["MaxPool", "AveragePool"])
def test_zero_pads_fold_exactly_in_float(pool):
    proto = padded_cnn(pool=pool)
    model = ir.from_proto(proto)
    result = FoldPadPass()(model)
    assert result.modified
    assert _pads_left(model) == []
    x = np.random.default_rng(3).normal(size=(2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(ir.to_proto(model), x), _run(proto, x), rtol=1e-5, atol=1e-5)
    assert not FoldPadPass()(model).modified


@pytest.mark.parametrize(("mode", "value"), [("reflect", None), ("edge", None), ("constant", 0.5)])
def test_unfoldable_pads_are_left_alone(mode, value):
    proto = padded_cnn(mode=mode, value=value, pool="AveragePool")
    model = ir.from_proto(proto)
    assert FoldPadPass()(model).modified  # the pool's zero Pad folds
    assert _pads_left(model) == ["pad_a", "pad_b"]
    x = np.random.default_rng(4).normal(size=(1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(ir.to_proto(model), x), _run(proto, x), rtol=1e-5, atol=1e-5)


def _pad_then_maxpool(source_op: str | None) -> onnx.ModelProto:
    """x -> [source_op] -> Pad(0) -> MaxPool(3x3)."""
    nodes, source = [], "x"
    if source_op is not None:
        nodes.append(helper.make_node(source_op, ["x"], ["s"], name="source"))
        source = "s"
    nodes += [helper.make_node("Pad", [source, "pads"], ["p"], name="pad"),
              helper.make_node("MaxPool", ["p"], ["y"], name="pool", kernel_shape=[3, 3])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])],
        [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_maxpool_takes_a_zero_pad_only_over_inputs_known_non_negative():
    x = np.random.default_rng(5).normal(size=(1, 2, 6, 6)).astype(np.float32)
    unknown = ir.from_proto(_pad_then_maxpool(None))
    assert not FoldPadPass()(unknown).modified  # negative inputs: padded zeros win windows
    proto = _pad_then_maxpool("Relu")
    after_relu = ir.from_proto(proto)
    assert FoldPadPass()(after_relu).modified
    np.testing.assert_array_equal(_run(ir.to_proto(after_relu), x), _run(proto, x))


def test_pad_then_conv_leaves_no_float_pad_in_orts_optimized_graph():
    proto = padded_cnn()
    quantized = onnxq.quantize(proto, FEEDS, CONFIG).model
    graph = optimized_graph(quantized)
    assert "Pad" not in op_counts(graph)
    assert op_counts(graph).get("QLinearConv") == 1  # the last Conv's output is the graph output
    assert float_islands(graph) == []
    x = FEEDS[0]["x"]
    assert _cosine(_run(quantized, x), _run(proto, x)) > 0.999


@pytest.mark.parametrize(("mode", "value"), [("reflect", None), ("constant", 0.5)])
def test_unfoldable_pad_runs_on_codes_with_the_same_outputs(mode, value):
    proto = padded_cnn(mode=mode, value=value)
    result = onnxq.quantize(proto, FEEDS, CONFIG)
    graph = optimized_graph(result.model)
    assert float_islands(graph) == []
    pads = [node for node in graph.node if node.op_type == "Pad"]
    assert len(pads) == 2 and pads[1].input[0].endswith("_q")  # the second reads codes
    # the same plan and parameters emitted with the Pad left in float: identical outputs
    float_pad = InsertQDQPass(result.plan, result.qparams)(prepare(ir.from_proto(proto))).model
    assert [island.op_type for island in float_islands(optimized_graph(ir.to_proto(float_pad)))] == ["Pad"]
    x = FEEDS[0]["x"]
    np.testing.assert_array_equal(_run(result.model, x), _run(ir.to_proto(float_pad), x))
    assert _cosine(_run(result.model, x), _run(proto, x)) > 0.999
