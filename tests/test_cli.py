"""The command line, run as a real subprocess: success, JSON, config files, and bad input.

Bad input must give exactly one line on stderr, a non-zero exit, and leave the output path as
it was (absent, or its old bytes).
"""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphs import small_cnn
from onnxq.config import CalibrationMethod, QuantConfig, dump_config


def onnxq(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxq", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.fixture
def cnn(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), model)
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, x=rng.normal(0, 1, (24, 3, 16, 16)).astype(np.float32))
    return model, calib


def test_quantize_writes_verified_model_and_json(cnn, tmp_path):
    model, calib = cnn
    out = tmp_path / "sub" / "cnn.int8.onnx"
    run = onnxq("quantize", model, out, "--calib", calib, "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["quantized_ops"]["Conv"] == 2
    assert summary["fidelity"]["held_out"] and summary["fidelity"]["feeds"] == 4
    assert summary["fidelity"]["outputs"][0]["cosine"] > 0.99
    onnx.checker.check_model(onnx.load(out))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_human_summary_and_config_file(cnn, tmp_path):
    model, calib = cnn
    config = tmp_path / "onnxq.toml"
    config.write_text(dump_config(QuantConfig(method=CalibrationMethod.PERCENTILE, holdout=2)))
    run = onnxq("quantize", model, tmp_path / "out.onnx", "--calib", calib, "--config", config,
                "--exclude", "Add")
    assert run.returncode == 0, run.stderr
    assert "left float: Add x1" in run.stdout
    assert "2 held-out feeds" in run.stdout


def _assert_one_line_error(run, pattern):
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("onnxq: error:")
    assert pattern in lines[0], lines[0]


def test_help_lists_every_option():
    run = onnxq("quantize", "--help")
    assert run.returncode == 0
    for option in ("--calib", "--method", "--per-tensor", "--act-type", "--exclude", "--config",
                   "--seed", "--json", "--min-cosine"):
        assert option in run.stdout


@pytest.mark.parametrize("case", ["not_onnx", "truncated", "missing", "unsupported_op"])
def test_bad_models(cnn, tmp_path, case):
    model, calib = cnn
    bad = tmp_path / f"{case}.onnx"
    if case == "not_onnx":
        bad.write_text("this is not a model\n" * 10)
    elif case == "truncated":
        data = model.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif case == "unsupported_op":
        graph = helper.make_graph(
            [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                          helper.make_opsetid("com.example", 1)],
                                    ir_version=10), bad)
    out = tmp_path / "out.onnx"
    run = onnxq("quantize", bad, out, "--calib", calib)
    _assert_one_line_error(run, {"not_onnx": "not", "truncated": str(bad.name),
                                 "missing": "not found", "unsupported_op": "Frobnicate"}[case])
    assert not out.exists()


@pytest.mark.parametrize("case, pattern", [
    ("names", "missing input(s) x"),
    ("shape", "has shape [1, 3, 8, 8]"),
    ("dtype", "dtype float64"),
    ("nan", "NaN"),
])
def test_bad_calibration_keeps_existing_output(cnn, tmp_path, case, pattern):
    model, _ = cnn
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (8, 3, 16, 16)).astype(np.float32)
    arrays = {"names": {"image": x}, "shape": {"x": x[:, :, :8, :8]},
              "dtype": {"x": x.astype(np.float64)}, "nan": {"x": np.where(x > 2.5, np.nan, x)}}
    calib = tmp_path / "bad.npz"
    np.savez(calib, **arrays[case])
    out = tmp_path / "existing.onnx"
    out.write_bytes(b"precious")
    run = onnxq("quantize", model, out, "--calib", calib)
    _assert_one_line_error(run, pattern)
    assert out.read_bytes() == b"precious"


def test_output_equal_to_input_is_refused(cnn):
    model, calib = cnn
    before = model.read_bytes()
    run = onnxq("quantize", model, model, "--calib", calib)
    _assert_one_line_error(run, "is the input model")
    assert model.read_bytes() == before


def test_exclude_that_matches_nothing(cnn, tmp_path):
    model, calib = cnn
    run = onnxq("quantize", model, tmp_path / "o.onnx", "--calib", calib, "--exclude", "Softmax")
    _assert_one_line_error(run, "matches no node")


def test_min_cosine_failure_writes_nothing(cnn, tmp_path):
    model, calib = cnn
    out = tmp_path / "o.onnx"
    run = onnxq("quantize", model, out, "--calib", calib, "--min-cosine", "1.0")
    assert run.returncode == 3
    assert "below min_cosine" in run.stderr
    assert not out.exists()


def test_mixed_bits_rules_budget_and_card(cnn, tmp_path):
    model, calib = cnn
    out = tmp_path / "cnn.mixed.onnx"
    conv = next(node.name for node in onnx.load(model).graph.node if node.op_type == "Conv")
    run = onnxq("quantize", model, out, "--calib", calib, "--avg-bits", "5", "--candidate-bits", "4,8",
                "--layer", f"{conv}=8", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["allocation"]["used"] <= summary["allocation"]["limit"]
    card = json.loads((tmp_path / "cnn.mixed.card.json").read_text())
    layers = {layer["layer"]: layer for layer in card["layers"]}
    assert layers[conv]["bits"] == 8 and layers[conv]["bits_from"] == f"rule {conv}=8"
    assert all(set(layer["sensitivity"]) == {"4", "8"} for name, layer in layers.items() if name != conv)
    assert sum(layer["bytes"] for layer in card["layers"]) < card["size"]["quantized_bytes"]
    markdown = (tmp_path / "cnn.mixed.card.md").read_text()
    assert "## Quantized layers" in markdown and conv in markdown


@pytest.mark.parametrize("args, pattern", [
    (("--layer", "nothing*=4"), "matches no quantizable layer"),
    (("--layer", "Conv=5"), "bits must be 2, 3, 4, 8 or float"),
    (("--avg-bits", "4", "--max-size", "1"), "one allocation budget"),
    (("--avg-bits", "1"), "avg_bits must be within"),
    (("--max-size", "0.0001"), "cannot be met"),
    (("--max-size", "0.01x"), "cannot be met"),
    (("--max-size", "small"), "not a number of MB"),
])
def test_bad_mixed_bits_options_fail_in_one_line(cnn, tmp_path, args, pattern):
    model, calib = cnn
    out = tmp_path / "out.onnx"
    run = onnxq("quantize", model, out, "--calib", calib, *args)
    _assert_one_line_error(run, pattern)
    assert not out.exists()


@pytest.mark.parametrize("args, pattern", [  # run as `python -m onnxq`: click names it so in "see"
    (("quantize", "--bogus"), "No such option '--bogus'. (see '"),
    (("compare", "--bogus"), "No such option '--bogus'. (see '"),
    (("compare", "float.onnx"), "Missing argument 'QUANTIZED'. (see '"),
    (("bench", "--bogus"), "No such option '--bogus'."),
    (("bench",), "Missing argument 'MODEL [MODEL ...]'. (see '"),
    (("nosuch",), "No such command 'nosuch'. (see '"),
    (("-v", "nosuch"), "No such command 'nosuch'. (see '"),
    (("--bogus",), "No such option '--bogus'."),
])
def test_usage_errors_of_every_command_and_the_group_are_one_line(args, pattern):
    run = onnxq(*args)
    _assert_one_line_error(run, pattern)
    command = " ".join(arg for arg in args[:1] if not arg.startswith("-") and arg != "nosuch")
    assert run.stderr.rstrip().endswith(f"onnxq {command}".rstrip() + " --help')"), run.stderr
    assert run.returncode == 2
    assert run.stdout == ""


def test_bare_group_still_shows_its_help():
    run = onnxq()
    assert "onnxq: error:" not in run.stdout + run.stderr
    assert "Commands:" in run.stdout + run.stderr and "quantize" in run.stdout + run.stderr
