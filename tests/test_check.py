"""`onnxq check` as a release gate, cards as provenance, and byte-identical runs.

Every model is quantized for real from the bundled digit CNN and its calibration data; every
check runs ONNX Runtime. Runs go through the command line in fresh processes, as a CI job
would run them.
"""

import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxq.report.gate import Measure, output_drop
from onnxq.scoring.fidelity import measure_fidelity

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "bundled"
FLOAT = BUNDLED / "digit_cnn.onnx"
CALIB = BUNDLED / "digit_cnn_calib.npz"
QUICK = ("--max-feeds", "24", "--quiet")
GATE_FAILED = 3


def onnxq(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxq", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _quantize(out: Path, *flags: str) -> Path:
    run = onnxq("quantize", FLOAT, out, "--calib", CALIB, *QUICK, *flags)
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("check")
    good = _quantize(folder / "good" / "digits.int8.onnx")
    damaged = _quantize(folder / "damaged" / "digits.w2.onnx", "--weight-bits", "2", "--no-bias-correction")
    return good, damaged


def _one_line_error(run):
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: error:"), run.stderr
    return lines[0]


def test_gate_passes_a_good_model_and_writes_junit(models, tmp_path):
    good, _ = models
    junit = tmp_path / "report.xml"
    run = onnxq("check", FLOAT, good, "--data", CALIB, "--max-drop", "0.01", "--min-cosine", "0.99",
                "--max-size-ratio", "0.35", "--junit", junit, "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["passed"] and {c["name"] for c in result["checks"]} == {
        "min-cosine logits", "max-drop logits", "max-size-ratio"}
    drop = next(c for c in result["checks"] if c["name"] == "max-drop logits")["value"]
    assert 0 < drop < 0.01
    root = ElementTree.parse(junit).getroot()
    cases = list(root.iter("testcase"))
    assert [c.get("name") for c in cases] == [c["name"] for c in result["checks"]]
    assert not list(root.iter("failure"))


def test_gate_fails_a_damaged_model_with_its_exit_code(models, tmp_path):
    _, damaged = models
    junit = tmp_path / "report.xml"
    run = onnxq("check", FLOAT, damaged, "--data", CALIB, "--max-drop", "0.01", "--metric", "logits=top1",
                "--junit", junit)
    assert run.returncode == GATE_FAILED, run.stdout + run.stderr
    assert "FAIL" in run.stdout and "failed: max-drop logits" in run.stdout
    failures = list(ElementTree.parse(junit).getroot().iter("failure"))
    assert len(failures) == 1 and "limit 0.01" in failures[0].get("message")


def test_baseline_catches_a_regression(models):
    good, damaged = models
    card = good.with_name("digits.int8.card.json")
    same = onnxq("check", FLOAT, good, "--data", CALIB, "--baseline", card, "--json")
    assert same.returncode == 0, same.stderr
    check = json.loads(same.stdout)["checks"][0]
    assert check["value"] == 0 and "re-measured on the same feeds" in check["detail"]
    worse = onnxq("check", FLOAT, damaged, "--data", CALIB, "--baseline", card, "--json")
    assert worse.returncode == GATE_FAILED
    regression = json.loads(worse.stdout)["checks"][0]["value"]
    assert regression > 0.002


def test_baseline_without_its_model_uses_the_recorded_fidelity(models, tmp_path):
    good, damaged = models
    card = json.loads(good.with_name("digits.int8.card.json").read_text())
    moved = tmp_path / "baseline.card.json"
    moved.write_text(json.dumps(card))  # the baseline model is not beside this copy
    run = onnxq("check", FLOAT, damaged, "--data", CALIB, "--baseline", moved, "--json")
    assert run.returncode == GATE_FAILED
    assert "recorded in baseline.card.json" in json.loads(run.stdout)["checks"][0]["detail"]


def test_card_describes_its_model_and_catches_another(models, tmp_path):
    good, damaged = models
    card_path = good.with_name("digits.int8.card.json")
    card = json.loads(card_path.read_text())
    provenance = card["provenance"]
    assert provenance["model"]["file"] == good.name
    assert set(provenance["versions"]) >= {"onnxq", "onnx", "onnx-ir", "onnxruntime"}
    assert card["config"]["seed"] == 0 and card["config"]["max_feeds"] == 24
    run = onnxq("check", "--card", card_path, good, "--json", cwd=FLOAT.parent.parent.parent)
    assert run.returncode == 0, run.stdout + run.stderr
    checks = {c["name"]: c for c in json.loads(run.stdout)["checks"]}
    assert checks["card: fidelity logits"]["value"] <= 1e-6  # re-measured on the same held-out feeds
    other = onnxq("check", "--card", card_path, FLOAT, damaged, "--data", CALIB, "--json")
    assert other.returncode == GATE_FAILED
    failed = {c["name"] for c in json.loads(other.stdout)["checks"] if not c["passed"]}
    assert "card: model file" in failed and "card: float model" not in failed


def test_bad_input_is_one_line(models, tmp_path):
    good, _ = models
    assert "OUTPUT=MEASURE" in _one_line_error(
        onnxq("check", FLOAT, good, "--data", CALIB, "--metric", "top1"))
    assert "unknown measure" in _one_line_error(
        onnxq("check", FLOAT, good, "--data", CALIB, "--metric", "logits=argmax"))
    assert "does not have" in _one_line_error(
        onnxq("check", FLOAT, good, "--data", CALIB, "--max-drop", "0.1", "--metric", "probs=top1"))
    assert "nothing to check" in _one_line_error(onnxq("check", FLOAT, good, "--data", CALIB))
    assert "--data is required" in _one_line_error(onnxq("check", FLOAT, good, "--max-drop", "0.1"))
    assert "must be a number >= 0" in _one_line_error(
        onnxq("check", FLOAT, good, "--data", CALIB, "--max-drop", "-1"))
    assert "card not found" in _one_line_error(onnxq("check", "--card", tmp_path / "no.json", good))
    not_a_card = tmp_path / "x.card.json"
    not_a_card.write_text("{}")
    assert "not an onnxq card" in _one_line_error(onnxq("check", "--card", not_a_card, good))
    assert "not found" in _one_line_error(onnxq("check", FLOAT, tmp_path / "missing.onnx", "--data", CALIB,
                                                "--max-drop", "0.1"))


@pytest.mark.parametrize("flags", [(), ("--method", "comq"), ("--avg-bits", "5")],
                         ids=["default", "comq", "mixed"])
def test_same_inputs_give_byte_identical_model_and_card(flags, tmp_path):
    outputs = []
    for run in ("first", "second"):
        out = _quantize(tmp_path / run / "digits.q.onnx", *flags)
        outputs.append((out.read_bytes(), out.with_name("digits.q.card.json").read_bytes(),
                        out.with_name("digits.q.card.md").read_bytes()))
    assert outputs[0] == outputs[1]


def _session(shape, noise=None):
    """y = x (the float model), or y = x + a fixed noise tensor (a damaged one)."""
    if noise is None:
        nodes, initializers = [helper.make_node("Identity", ["x"], ["y"])], []
    else:
        nodes = [helper.make_node("Add", ["x", "noise"], ["y"])]
        initializers = [onnx.numpy_helper.from_array(noise.astype(np.float32), "noise")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_measures_follow_the_output_shape():
    rng = np.random.default_rng(0)
    heatmap = rng.random((1, 1, 16, 16)).astype(np.float32)
    report = measure_fidelity(_session([1, 1, 16, 16]),
                              _session([1, 1, 16, 16], 0.01 * rng.standard_normal(heatmap.shape)),
                              [{"x": heatmap}])
    output = report.outputs[0]
    assert output.top1_agreement is None and output.cosine > 0.999  # no class axis on a heatmap
    logits = rng.standard_normal((8, 10)).astype(np.float32)
    report = measure_fidelity(_session([8, 10]), _session([8, 10], 0.3 * rng.standard_normal(logits.shape)),
                              [{"x": logits}])
    output = report.outputs[0]
    assert output.top1_agreement is not None
    assert output_drop(output, Measure.TOP1) == pytest.approx(1 - output.top1_agreement)
    assert output_drop(output, Measure.SQNR) == pytest.approx(10 ** (-output.sqnr_db / 10))
    assert output_drop(output, Measure.COSINE) == pytest.approx(1 - output.cosine)


def test_card_of_a_run_without_data_checks_its_files(tmp_path):
    out = tmp_path / "digits.dyn.onnx"
    run = onnxq("quantize", FLOAT, out, "--activations", "dynamic", "--quiet")
    assert run.returncode == 0, run.stderr
    card = out.with_name("digits.dyn.card.json")
    assert "records no data" in _one_line_error(onnxq("check", "--card", card, FLOAT, out))
    checked = onnxq("check", "--card", card, FLOAT, out, "--data", CALIB, "--max-drop", "0.01", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    names = [c["name"] for c in json.loads(checked.stdout)["checks"]]
    assert names == ["card: model file", "card: float model", "max-drop logits"]
