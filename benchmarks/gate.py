"""`onnxq check` as a release gate on the zoo: a good model passes, a damaged one fails.

For MiniLM-L6 and EfficientNet-Lite0: quantize with the defaults (W8A8) and, as a deliberately
damaged model, with 2-bit round-to-nearest weights; then gate both with `onnxq check --max-drop
0.01` on feeds made from the zoo's evaluation data (never calibrated on), the damaged one also
against the good one's card (`--baseline`). Every step is the real command line. Writes
benchmarks/results/gate.json and gate.md.

    python benchmarks/gate.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnxq.zoo import efficientnet_lite0, minilm_l6
from onnxq.zoo.common import layout

HERE = Path(__file__).resolve().parent
MAX_DROP = "0.01"
GATE_FEEDS = 64


def _zoo_dir() -> Path:
    return Path(os.environ.get("ONNXQ_ZOO_DIR", HERE.parent / ".zoo"))


def gate_feeds(model: str, folder: Path) -> Path:
    """One .npz feed per evaluation sample (the first GATE_FEEDS), in the model's input format."""
    built = layout(_zoo_dir(), model)
    folder.mkdir(parents=True, exist_ok=True)
    if model == "efficientnet_lite0":
        images = np.load(built.eval_dir / "eval.npz")["images"][:GATE_FEEDS]
        name = onnx.load(str(built.onnx_path), load_external_data=False).graph.input[0].name
        feeds = [{name: x[None]} for x in efficientnet_lite0.normalize(images)]
    else:
        packed = np.load(built.eval_dir / "sentences.npz")
        sequences = np.split(packed["ids"], np.cumsum(packed["lengths"])[:-1])[:GATE_FEEDS]
        feeds = [minilm_l6.feed(ids) for ids in sequences]
    for index, feed in enumerate(feeds):
        np.savez(folder / f"feed_{index:03d}.npz", **feed)
    return folder


def onnxq(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxq", *map(str, args)], capture_output=True, text=True)


def run_model(model: str, work: Path) -> dict[str, object]:
    built = layout(_zoo_dir(), model)
    feeds = gate_feeds(model, work / f"{model}_gate")
    rows: dict[str, object] = {}
    good = work / model / "default.onnx"
    for label, out, flags in (("default W8A8", good, ()),
                              ("W2 round to nearest", work / model / "w2.onnx",
                               ("--weight-bits", "2", "--no-bias-correction"))):
        start = time.perf_counter()
        quantized = onnxq("quantize", built.onnx_path, out, "--calib", built.calib_dir, "--quiet", *flags)
        if quantized.returncode != 0:
            rows[label] = {"error": quantized.stderr.strip()}
            continue
        baseline = ("--baseline", good.with_name("default.card.json")) if out != good else ()
        check = onnxq("check", built.onnx_path, out, "--data", feeds, "--max-feeds", GATE_FEEDS,
                      "--max-drop", MAX_DROP, *baseline, "--junit", out.with_suffix(".junit.xml"), "--json")
        report = json.loads(check.stdout) if check.stdout.strip() else {"error": check.stderr.strip()}
        rows[label] = {"exit_code": check.returncode, "checks": report.get("checks", report),
                       "seconds": round(time.perf_counter() - start, 1)}
    return rows


def markdown(results: dict[str, dict[str, object]]) -> str:
    lines = ["# `onnxq check --max-drop 0.01` on the zoo", "",
             f"Feeds: the first {GATE_FEEDS} samples of each model's evaluation data (never calibrated on). "
             "The damaged model is also checked against the default model's card (`--baseline`).", "",
             "| model | quantized as | exit | check | value | limit | result |",
             "|---|---|---:|---|---:|---:|---|"]
    for model, rows in results.items():
        for label, row in rows.items():
            for check in row.get("checks", []) if isinstance(row.get("checks"), list) else []:
                result = "pass" if check["passed"] else "FAIL"
                lines.append(f"| {model} | {label} | {row['exit_code']} | {check['name']} | "
                             f"{check['value']} | {check['limit']} | {result} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = {model: run_model(model, Path(work)) for model in ("minilm_l6", "efficientnet_lite0")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gate.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "gate.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
