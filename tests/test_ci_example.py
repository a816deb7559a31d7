"""The CI example (examples/ci/quantize_and_check.sh) end to end on the bundled model: real
commands in a real shell, once passing every gate and once with a threshold that must fail.

The script's `pip install` step is skipped here (INSTALL=0): the test runs in the environment
the tests were installed into.
"""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "ci" / "quantize_and_check.sh"


def _run(artifacts: Path, **settings: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "INSTALL": "0", "PYTHON": sys.executable, "ARTIFACTS": str(artifacts), **settings}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)


def test_release_job_passes_and_keeps_its_artifacts(tmp_path):
    run = _run(tmp_path / "artifacts")
    assert run.returncode == 0, run.stdout + run.stderr
    artifacts = tmp_path / "artifacts"
    assert {p.name for p in artifacts.iterdir()} >= {
        "model.int8.onnx", "model.int8.card.json", "check.junit.xml", "card.junit.xml", "bench.json"}
    checks = {c["name"]: c for c in json.loads((artifacts / "check.json").read_text())["checks"]}
    assert checks["baseline logits"]["passed"] and checks["max-drop logits"]["value"] < 0.01
    card = {c["name"]: c for c in json.loads((artifacts / "card_check.json").read_text())["checks"]}
    assert all(c["passed"] for c in card.values()) and "card: model file" in card
    bench = json.loads((artifacts / "bench.json").read_text())
    assert len(bench) == 2 and bench[1]["integer_kernels"]


def test_release_job_fails_a_gate_it_cannot_meet(tmp_path):
    run = _run(tmp_path / "artifacts", MAX_DROP="0.0000001")
    assert run.returncode == 3, run.stdout + run.stderr
    report = ElementTree.parse(tmp_path / "artifacts" / "check.junit.xml").getroot()
    failed = [case.get("name") for case in report.iter("testcase") if case.find("failure") is not None]
    assert failed == ["max-drop logits"]
    assert (tmp_path / "artifacts" / "model.int8.onnx").is_file()  # kept for inspection
