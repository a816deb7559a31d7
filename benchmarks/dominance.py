"""Does mixed precision pay for itself? Per zoo model: uniform W4A8 (COMQ, the default group
size), then the allocator under `--max-size` set to exactly that file's size and under
`--avg-bits 4`, each evaluated on the zoo's evaluation set.

The claims checked (the low-bit issue's must-show):
    mixed at uniform W4's size   accuracy >= uniform W4's, file no larger
    --avg-bits 4                 file no larger than uniform W4's at the same group size

Every run quantizes from the first `--feeds` calibration feeds (the last `--holdout` held out of
every statistic); held-out calibration cosine, evaluation metric and file bytes are recorded.
Nothing here chooses a default: it measures.

    python benchmarks/dominance.py digits minilm_l6 --out DIR

Writes one JSON line per run to DIR/dominance.jsonl (appended) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from group_sizes import saved_and_evaluated

import onnxq
from onnxq.config import QuantConfig, WeightMethod
from onnxq.zoo import default_cache_dir, get
from onnxq.zoo.common import load_feeds


def measure(model: str, label: str, config: QuantConfig, feeds: int) -> dict:
    """Quantize `model` with `config`, save, evaluate; the row of one run."""
    zoo = get(model)
    built = zoo.build(default_cache_dir())
    calib = load_feeds(built.calib_dir)[:feeds]
    start = time.perf_counter()
    result = onnxq.quantize(built.onnx_path, calib, config)
    seconds = time.perf_counter() - start
    size, evaluation = saved_and_evaluated(result, zoo, built)
    bits = [spec.grid.bits for spec in result.plan.weights]
    allocation = result.summary()["allocation"]
    return {"model": model, "row": label, "held_out_cosine": result.fidelity.outputs[0].cosine,
            "uniform_check": allocation and allocation["uniform_check"],
            "evaluation": evaluation, "primary_metric": zoo.primary_metric,
            "file_bytes": size, "float_bytes": built.onnx_path.stat().st_size,
            "bits_histogram": {str(b): bits.count(b) for b in sorted(set(bits))},
            "quantize_seconds": round(seconds, 1)}


def rows_for(model: str, feeds: int, holdout: int) -> list[dict]:
    base = dict(weight_method=WeightMethod.COMQ, holdout=holdout)
    uniform = measure(model, "uniform W4", QuantConfig(weight_bits=4, **base), feeds)
    budget_mb = uniform["file_bytes"] / 1e6
    return [uniform,
            measure(model, "mixed at W4's size", QuantConfig(max_size_mb=budget_mb, **base), feeds),
            measure(model, "avg-bits 4", QuantConfig(avg_bits=4.0, **base), feeds)]


def table(rows: list[dict]) -> str:
    lines = ["| model | row | primary metric | held-out calib. cosine | size / float | bytes | bits |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        metric = row["evaluation"][row["primary_metric"]]
        lines.append(f"| {row['model']} | {row['row']} | {metric:.4f} | {row['held_out_cosine']:.5f} | "
                     f"{row['file_bytes'] / row['float_bytes']:.4f} | {row['file_bytes']} | "
                     f"{row['bits_histogram']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--feeds", type=int, default=64)
    parser.add_argument("--holdout", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        for row in rows_for(model, args.feeds, args.holdout):
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out / "dominance.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
