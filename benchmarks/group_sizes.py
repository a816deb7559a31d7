"""Choose the default group size of sub-8-bit weights on calibration data, and report how the
choice holds up on the evaluation sets.

For each zoo model, weight method and group size (0: per channel), W4A8 is quantized from the
first `--feeds` calibration feeds with the last `--holdout` of them held out of every
statistic; the held-out feeds' fidelity (mean cosine, top-1 agreement where the output is class
scores) is what the choice reads. The evaluation metric of the zoo and the file size are
recorded beside it, to report the calibration-vs-evaluation gap, never to choose.

    python benchmarks/group_sizes.py minilm_l6 --methods comq --sizes 0 32 64 128 --out DIR

Writes one JSON line per run to DIR/group_sizes.jsonl (appended).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import onnxq
from onnxq.config import QuantConfig, WeightMethod
from onnxq.zoo import default_cache_dir, get
from onnxq.zoo.common import load_feeds


def saved_and_evaluated(result, zoo, built) -> tuple[int, dict]:
    """The written file's bytes (model and external data) and the zoo's evaluation of it."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{built.name}.onnx"
        result.save(path)
        size = sum(p.stat().st_size for p in Path(folder).iterdir()
                   if p.name.startswith(built.name) and p.suffix in (".onnx", ".data"))
        return size, zoo.evaluate(path, built)


def measure(model: str, method: str, group: int, feeds: int, holdout: int) -> dict:
    zoo = get(model)
    built = zoo.build(default_cache_dir())
    calib = load_feeds(built.calib_dir)[:feeds]
    config = QuantConfig(weight_bits=4, weight_method=WeightMethod(method), weight_group_size=group,
                         holdout=holdout)
    start = time.perf_counter()
    result = onnxq.quantize(built.onnx_path, calib, config)
    seconds = time.perf_counter() - start
    size, evaluation = saved_and_evaluated(result, zoo, built)
    output = result.fidelity.outputs[0]
    return {"model": model, "method": method, "group_size": group, "bits": 4,
            "held_out_feeds": result.fidelity.feeds, "held_out_cosine": output.cosine,
            "held_out_top1": output.top1_agreement, "held_out_sqnr_db": output.sqnr_db,
            "file_bytes": size, "float_bytes": built.onnx_path.stat().st_size,
            "evaluation": evaluation, "quantize_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--methods", nargs="+", default=["rtn", "comq"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[0, 32, 64, 128])
    parser.add_argument("--feeds", type=int, default=64)
    parser.add_argument("--holdout", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        for method in args.methods:
            for group in args.sizes:
                row = measure(model, method, group, args.feeds, args.holdout)
                print(json.dumps(row), flush=True)
                with open(args.out / "group_sizes.jsonl", "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
