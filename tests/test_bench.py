"""`onnxq bench` on real models through ONNX Runtime: the bundled float digit CNN and an int8
copy quantized here.

Timings on a shared machine are noise, so nothing here asserts on speed: only that the numbers
are consistent with each other (p50 <= p90, throughput = batch / mean), that sizes are the
files' sizes, that the int8 model really runs integer kernels, that feeds take the shapes
asked for, and that every bad input is one `onnxq: error:` line on stderr with exit code 2.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import onnxq
from onnxq.cli.bench import bench, parse_shape
from onnxq.errors import CalibrationDataError, ConfigError, OnnxqError
from onnxq.report.bench import (
    BenchSettings,
    benchmark_model,
    check_same_inputs,
    make_feed,
    model_file_bytes,
)

ROOT = Path(__file__).parents[1]
FLOAT = ROOT / "models" / "bundled" / "digit_cnn.onnx"
CALIB = ROOT / "models" / "bundled" / "digit_cnn_calib.npz"
QUICK = BenchSettings(warmup=1, runs=5)
QUICK_FLAGS = ["--runs", "5", "--warmup", "1"]


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "digit_cnn.int8.onnx"
    onnxq.quantize(FLOAT, CALIB).save(path)
    return path


def token_model(path: Path) -> Path:
    """input_ids, token_type_ids, attention_mask [batch, sequence] int64 -> Gather embeddings
    (out-of-range ids or token types would make ORT fail) masked by attention_mask."""
    vocab = helper.make_tensor("vocab", TensorProto.FLOAT, [100, 4], np.ones(400, np.float32))
    types = helper.make_tensor("types", TensorProto.FLOAT, [2, 4], np.ones(8, np.float32))
    nodes = [helper.make_node("Gather", ["vocab", "input_ids"], ["tokens"]),
             helper.make_node("Gather", ["types", "token_type_ids"], ["typed"]),
             helper.make_node("Add", ["tokens", "typed"], ["embedded"]),
             helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
             helper.make_node("Mul", ["embedded", "mask3"], ["out"])]
    last = helper.make_tensor("last", TensorProto.INT64, [1], [-1])
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
              for name in ("input_ids", "token_type_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "tokens", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                             ["batch", "sequence", 4])],
                              initializer=[vocab, types, last])
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def reshape_model(path: Path) -> Path:
    """x [batch, n] reshaped to [1, 7]: runs only when n is 7, not at the default 128."""
    target = helper.make_tensor("target", TensorProto.INT64, [2], [1, 7])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "target"], ["y"])], "reshape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7])],
                              initializer=[target])
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


# --- the API -----------------------------------------------------------------------------------


def test_float_and_int8_results_are_consistent(int8_model):
    feed = make_feed(FLOAT, QUICK)
    results = [benchmark_model(path, feed, QUICK) for path in (FLOAT, int8_model)]
    for path, result in zip((FLOAT, int8_model), results, strict=True):
        assert result.model == str(path)
        assert result.file_bytes == path.stat().st_size
        assert result.batch == 1 and result.provider == "cpu" and result.threads == 1
        assert 0 < result.p50_ms <= result.p90_ms
        assert result.load_seconds > 0
        assert result.throughput_per_s == pytest.approx(result.batch / (result.mean_ms / 1e3))
    float_result, int8_result = results
    assert float_result.integer_kernels == {}
    assert int8_result.integer_kernels.get("QLinearConv", 0) >= 1
    assert int8_result.file_bytes < float_result.file_bytes / 3


def test_generated_feed_follows_the_declared_input_and_the_batch():
    feed = make_feed(FLOAT, QUICK)
    assert set(feed) == {"input"} and feed["input"].shape == (1, 1, 28, 28)
    assert feed["input"].dtype == np.float32
    np.testing.assert_array_equal(feed["input"], make_feed(FLOAT, QUICK)["input"])  # seeded
    settings = BenchSettings(warmup=1, runs=3, batch=4)
    batched = make_feed(FLOAT, settings)
    assert batched["input"].shape == (4, 1, 28, 28)
    assert benchmark_model(FLOAT, batched, settings).batch == 4


def test_stacked_data_gives_the_first_batch_samples():
    stacked = np.load(CALIB)["input"]
    feed = make_feed(FLOAT, BenchSettings(batch=8), data=CALIB)
    np.testing.assert_array_equal(feed["input"], stacked[:8])
    np.testing.assert_array_equal(make_feed(FLOAT, QUICK, data=CALIB)["input"], stacked[:1])
    with pytest.raises(CalibrationDataError, match="holds 64 sample"):
        make_feed(FLOAT, BenchSettings(batch=65), data=CALIB)


def test_token_inputs_get_sequence_defaults_valid_ids_masks_and_shape_overrides(tmp_path):
    model = token_model(tmp_path / "tokens.onnx")
    feed = make_feed(model, QUICK)
    assert {name: array.shape for name, array in feed.items()} == {
        "input_ids": (1, 128), "token_type_ids": (1, 128), "attention_mask": (1, 128)}
    assert all(array.dtype == np.int64 for array in feed.values())
    assert feed["input_ids"].min() >= 0 and feed["input_ids"].max() < 100
    assert np.all(feed["attention_mask"] == 1) and np.all(feed["token_type_ids"] == 0)
    shapes = tuple((name, (2, 16)) for name in ("input_ids", "token_type_ids", "attention_mask"))
    settings = BenchSettings(warmup=1, runs=3, batch=2, shapes=shapes)
    overridden = make_feed(model, settings)
    assert all(array.shape == (2, 16) for array in overridden.values())
    assert benchmark_model(model, overridden, settings).batch == 2


def test_file_bytes_include_external_data(tmp_path):
    model = onnx.load(FLOAT)
    path = tmp_path / "external.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="external.onnx.data",
                    size_threshold=1024)
    data_file = tmp_path / "external.onnx.data"
    assert data_file.stat().st_size > path.stat().st_size
    assert model_file_bytes(path) == path.stat().st_size + data_file.stat().st_size
    assert benchmark_model(path, make_feed(path, QUICK), QUICK).file_bytes == model_file_bytes(path)


@pytest.mark.parametrize("changes, pattern", [
    ({"threads": 0}, "threads"), ({"runs": 0}, "runs"), ({"warmup": -1}, "warmup"),
    ({"provider": "tpu"}, "unknown provider"), ({"batch": 0}, "batch"),
    ({"shapes": (("input", (1, 0, 28, 28)),)}, "positive"),
    ({"shapes": (("input", (1,)), ("input", (2,)))}, "twice"),
])
def test_settings_are_validated(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        BenchSettings(**changes)


def test_feed_shape_errors_are_config_errors():
    with pytest.raises(ConfigError, match="does not take"):
        make_feed(FLOAT, BenchSettings(shapes=(("pixels", (1, 1, 28, 28)),)))
    with pytest.raises(ConfigError, match="fixed at 1"):
        make_feed(FLOAT, BenchSettings(shapes=(("input", (1, 3, 28, 28)),)))
    with pytest.raises(ConfigError, match="contradicts batch"):
        make_feed(FLOAT, BenchSettings(batch=3, shapes=(("input", (2, 1, 28, 28)),)))
    with pytest.raises(ConfigError, match="data file"):
        make_feed(FLOAT, BenchSettings(shapes=(("input", (2, 1, 28, 28)),)), data=CALIB)


def test_a_feed_that_does_not_fit_is_refused(int8_model):
    with pytest.raises(CalibrationDataError, match="dtype float64"):
        benchmark_model(int8_model, {"input": np.zeros((1, 1, 28, 28))}, QUICK)


def test_check_same_inputs_names_the_odd_model(int8_model, tmp_path):
    check_same_inputs([FLOAT, int8_model])
    other = token_model(tmp_path / "tokens.onnx")
    with pytest.raises(OnnxqError, match=f"^{other} takes inputs attention_mask, input_ids"):
        check_same_inputs([FLOAT, int8_model, other])


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime build has CUDA")
def test_cuda_without_a_cuda_build_is_an_error():
    with pytest.raises(OnnxqError, match="not available"):
        benchmark_model(FLOAT, make_feed(FLOAT, QUICK), BenchSettings(provider="cuda"))


def test_parse_shape():
    assert parse_shape("input_ids=1,128") == ("input_ids", (1, 128))
    assert parse_shape("a=b=3") == ("a=b", (3,))


# --- the command -------------------------------------------------------------------------------


def run_bench(*args):
    return CliRunner().invoke(bench, [str(a) for a in args], prog_name="onnxq bench")


def test_json_lists_each_model_with_ratios_to_the_first(int8_model):
    run = run_bench(FLOAT, int8_model, *QUICK_FLAGS, "--json")
    assert run.exit_code == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [row["model"] for row in rows] == [str(FLOAT), str(int8_model)]
    first, second = rows
    assert first["size_ratio"] == first["p50_ratio"] == first["speedup"] == 1.0
    assert second["size_ratio"] == pytest.approx(second["file_bytes"] / first["file_bytes"])
    assert second["speedup"] == pytest.approx(first["p50_ms"] / second["p50_ms"])
    assert second["p50_ratio"] == pytest.approx(1 / second["speedup"])
    assert "QLinearConv" in second["integer_kernels"]


def test_table_and_stacked_data(int8_model):
    run = run_bench(FLOAT, int8_model, *QUICK_FLAGS, "--data", CALIB, "--batch", "8")
    assert run.exit_code == 0, run.stderr
    for text in ("p50 ms", "speed-up", "batch 8", "QLinearConv", "digit_cnn.int8.onnx"):
        assert text in run.stdout


def test_batch_flag_changes_the_fed_shape():
    run = run_bench(FLOAT, *QUICK_FLAGS, "--batch", "3", "--json")
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)[0]["batch"] == 3


def test_shape_flag_makes_a_model_with_other_symbolic_dims_run(tmp_path):
    model = reshape_model(tmp_path / "reshape.onnx")
    run = run_bench(model, *QUICK_FLAGS, "--shape", "x=1,7", "--json")
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)[0]["batch"] == 1


def test_runs_as_a_subprocess(int8_model):
    code = "from onnxq.cli.bench import bench; bench()"
    run = subprocess.run([sys.executable, "-c", code, str(FLOAT), str(int8_model), *QUICK_FLAGS,
                          "--threads", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert [row["threads"] for row in json.loads(run.stdout)] == [2, 2]

def test_a_model_that_fails_on_the_feed_is_one_line_even_from_ort_itself(tmp_path):
    """ORT's own C++ log goes to file descriptor 2, which only a real process shows."""
    model = reshape_model(tmp_path / "reshape.onnx")
    code = "from onnxq.cli.bench import bench; bench()"
    bad = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    lines = bad.stderr.splitlines()
    assert len(lines) == 1, bad.stderr
    assert re.match(r"onnxq: error: ONNX Runtime failed to run .*reshape.onnx on the feed \(x \[1, 128\]\)",
                    lines[0])
    assert lines[0].endswith("give other shapes or a data file")


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "not_onnx.onnx").write_text("not a model")
    np.savez(tmp_path / "wrong_name.npz", pixels=np.zeros((4, 1, 28, 28), np.float32))
    np.savez(tmp_path / "wrong_dtype.npz", input=np.zeros((4, 1, 28, 28)))
    np.savez(tmp_path / "wrong_shape.npz", input=np.zeros((4, 1, 32, 32), np.float32))
    token_model(tmp_path / "tokens.onnx")
    return tmp_path


@pytest.mark.parametrize("args, pattern", [
    (["{tmp}/missing.onnx"], "model file not found"),
    (["{tmp}/not_onnx.onnx"], "not a readable ONNX model"),
    (["{float}", "--data", "{tmp}/wrong_name.npz"], "missing input.*input; unknown name.*pixels"),
    (["{float}", "--data", "{tmp}/wrong_dtype.npz"], "dtype float64"),
    (["{float}", "--data", "{tmp}/wrong_shape.npz"], r"shape \[1, 1, 32, 32\]"),
    (["{float}", "--data", "{tmp}/missing.npz"], "data file not found"),
    (["{float}", "{tmp}/tokens.onnx"], "tokens.onnx takes inputs .* models compared must take"),
    (["{float}", "--shape", "input=1,x"], "bad --shape"),
    (["{float}", "--shape", "1,1,28,28"], "bad --shape"),
    (["{float}", "--shape", "pixels=1,1,28,28"], "does not take"),
    (["{float}", "--threads", "0"], "threads must be at least 1"),
    (["{float}", "--provider", "tpu"], "unknown provider"),
    (["{float}", "--runs", "many"], "Invalid value for '--runs'"),
    ([], "Missing argument"),
])
def test_bad_input_is_one_line_and_exit_2(bad_files, args, pattern):
    run = run_bench(*QUICK_FLAGS, *[a.format(tmp=bad_files, float=FLOAT) for a in args])
    assert run.exit_code == 2
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: error: ")
    assert re.search(pattern, lines[0]), lines[0]
