"""Float islands: a float op between a DequantizeLinear and a QuantizeLinear in ORT's optimized
graph (a fusion ORT missed). Bench lists them; annotate closes those of joins with a float input."""

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxq
from graphs import padded_cnn, swish_cnn
from onnxq.cli.bench import bench
from onnxq.config import QuantConfig
from onnxq.report.bench import BenchSettings, benchmark_model, make_feed
from onnxq.report.kernels import float_islands, integer_kernel_counts, op_counts, optimized_graph

RNG_FEEDS = np.random.default_rng(7)
FEEDS = [{"x": RNG_FEEDS.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(12)]
CONFIG = QuantConfig(holdout=2, equalize=False, smooth=False)


def _qdq_island_model() -> onnx.ModelProto:
    """x -> Q -> DQ -> Erf -> Q -> DQ -> y: ORT has no integer Erf, so it stays a float island."""
    inits = [numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.uint8(128), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="x_dq"),
             helper.make_node("Erf", ["xd"], ["e"], name="erf"),
             helper.make_node("QuantizeLinear", ["e", "s", "z"], ["eq"], name="e_q"),
             helper.make_node("DequantizeLinear", ["eq", "s", "z"], ["y"], name="e_dq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)


def test_bench_lists_the_float_islands_of_a_model(tmp_path):
    path = tmp_path / "island.onnx"
    onnx.save(_qdq_island_model(), str(path))
    islands = float_islands(optimized_graph(onnx.load(str(path))))
    assert [(island.op_type, island.node) for island in islands] == [("Erf", "erf")]
    settings = BenchSettings(warmup=0, runs=2)
    result = benchmark_model(path, make_feed(path, settings), settings)
    assert result.float_islands == ("Erf erf",)
    printed = CliRunner().invoke(bench, [str(path), "--runs", "2", "--warmup", "0"])
    assert printed.exit_code == 0
    assert "float islands (DequantizeLinear -> float op -> QuantizeLinear): Erf erf" in printed.output
    folded = tmp_path / "folded.onnx"
    onnx.save(onnxq.quantize(padded_cnn(), FEEDS, CONFIG).model, str(folded))
    assert benchmark_model(folded, make_feed(folded, settings), settings).float_islands == ()


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_a_swish_with_a_float_sigmoid_branch_runs_in_integer_once_closed():
    proto = swish_cnn()
    x = FEEDS[0]["x"]
    reference = _run(proto, x)
    kept = onnxq.quantize(proto, FEEDS, CONFIG.replace(close_float_islands=False)).model
    assert [str(island) for island in float_islands(optimized_graph(kept))] == ["Mul swish"]
    closed = onnxq.quantize(proto, FEEDS, CONFIG).model
    graph = optimized_graph(closed)
    assert float_islands(graph) == []
    assert integer_kernel_counts(op_counts(graph)).get("QLinearMul") == 1
    for model in (kept, closed):
        out = _run(model, x)
        assert np.abs(out - reference).max() < 0.05 * np.abs(reference).max()
