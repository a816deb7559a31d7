"""onnxq against other post-training quantizers on every zoo model: accuracy, size, latency, cost.

For each zoo model, every row of `rowspecs.ROWS` that applies to it quantizes the float model
from the same calibration feeds (the first `--feeds` of the zoo's calibration folder), in its
own child process (so that peak memory figures do not mix). Then, for every row:

- the zoo metrics of the quantized model on the zoo's evaluation data (primary metric first);
- file size over the float model's;
- ONNX Runtime latency (CPU EP, batch 1, one representative calibration feed) over the float
  model's, at 1 and 2 intra-op threads, and the integer kernels ORT runs (`onnxq.report.bench`);
- quantization wall time and the child process's peak resident memory (VmHWM).

A quantizer that fails is a row with its error. Writes, under `--out` (benchmarks/results):
results.json, results.md (one table per model), summary.md (the compact table of the README),
accuracy_vs_size.png and quant_time.png; each row's quantizer output goes to logs/.

    python benchmarks/run.py                      # everything (tens of minutes)
    python benchmarks/run.py digits minilm_l6 --tools onnxq nncf
    python benchmarks/run.py --quick              # smoke run: digits, 8 feeds, few timed runs
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import multiprocessing
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rowspecs import FAMILIES, ROW_BY_LABEL, ROWS, RowSpec

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ZOO_MODELS = ("digits", "efficientnet_lite0", "minilm_l6", "ppocr_rec")
THREADS = (1, 2)


@dataclass(frozen=True)
class LatencyPlan:
    """Latency is timed in `rounds` interleaved rounds (float, then every row, each round) of
    `runs` timed runs after `warmup` untimed ones, so that load from other jobs on a shared
    machine hits the float model and the rows alike. Reported: the median over rounds of each
    round's p50, and the median over rounds of the per-round ratio to float."""

    rounds: int = 3
    runs: int = 10
    warmup: int = 3


@dataclass(frozen=True)
class Limits:
    """What one quantization may take before it is stopped and reported as failed."""

    seconds: float = 1800.0
    rss_mb: float = 12 * 1024.0


# --- one quantization in a child process ----------------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _child(results, label: str, source: str, target: str, calib_dir: str, model: str,
           log_path: str) -> None:
    """Quantize in this (spawned) process and send back time and peak memory, or the error."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    from quantizers import QUANTIZERS, prepare_child

    spec = ROW_BY_LABEL[label]
    quantizer = QUANTIZERS[spec.quantizer]
    try:
        prepare_child(quantizer)
        start = time.perf_counter()
        quantizer.run(Path(source), Path(target), Path(calib_dir), model, **dict(spec.options))
        seconds = time.perf_counter() - start
        results.put({"seconds": seconds, "peak_rss_mb": _peak_rss_mb()})
    except Exception as error:  # a failing quantizer is a row, not a crash
        traceback.print_exc()
        results.put({"error": _one_line(error), "peak_rss_mb": _peak_rss_mb(),
                     "trace": traceback.format_exc(limit=-4)})


def _resident_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def quantize_isolated(spec: RowSpec, source: Path, target: Path, calib_dir: Path, model: str,
                      log_path: Path, limits: Limits) -> dict[str, Any]:
    """Quantize in a spawned child; stop it past the time or memory limit (a quantizer that
    would exhaust a shared machine's memory is a failed row, not an OOM kill of the machine's
    other jobs)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(results, spec.label, str(source), str(target),
                                                   str(calib_dir), model, str(log_path)))
    process.start()
    deadline = time.monotonic() + limits.seconds
    peak = 0.0
    try:
        while True:
            try:
                return results.get(timeout=0.25)
            except queue.Empty:
                peak = max(peak, _resident_mb(process.pid))
                if not process.is_alive():
                    code = process.exitcode
                    why = " (killed: out of memory?)" if code == -9 else ""
                    return {"error": f"quantizing process died with exit code {code}{why}"}
                if peak > limits.rss_mb:
                    process.kill()
                    return {"error": f"stopped at {peak / 1024:.1f} GB resident, over the memory limit "
                                     f"(--max-rss-gb {limits.rss_mb / 1024:g})", "peak_rss_mb": peak}
                if time.monotonic() > deadline:
                    process.kill()
                    return {"error": f"stopped after {limits.seconds:.0f} s (--timeout)"}
    finally:
        process.join(timeout=30)


# --- data, evaluation and latency -----------------------------------------------------------------


def _feed_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import numpy as np

    with np.load(path) as data:
        return {name: tuple(data[name].shape) for name in data.files}


def calibration_folder(calib_dir: Path, count: int, folder: Path) -> list[Path]:
    """The first `count` feeds of the zoo's calibration folder, linked into `folder`: the one
    set every quantizer reads."""
    sources = sorted(calib_dir.glob("*.npz"))[:count]
    folder.mkdir(parents=True, exist_ok=True)
    for path in sources:
        (folder / path.name).symlink_to(path)
    return sources


def latency_feed_path(feeds: list[Path]) -> Path:
    """A representative calibration feed: the one of median size (sequence length, width)."""
    import numpy as np

    sizes = [sum(int(np.prod(s)) for s in _feed_shapes(p).values()) for p in feeds]
    order = sorted(range(len(feeds)), key=lambda i: (sizes[i], feeds[i].name))
    return feeds[order[len(order) // 2]]


def measure_latency(paths: dict[str, Path], feed_path: Path, plan: LatencyPlan) -> dict[str, dict]:
    """label -> {threads: {"p50_ms", "p90_ms", "ratio"}, "integer_kernels", "float_islands"} or
    {"error"}; the first entry of `paths` is the float model, the reference of the ratios."""
    from onnxq.report.bench import BenchSettings, benchmark_model, make_feed

    labels = list(paths)
    reference = labels[0]
    p50s: dict[tuple[str, int], list[float]] = {}
    p90s: dict[tuple[str, int], list[float]] = {}
    out: dict[str, dict] = {label: {} for label in labels}
    for round_index in range(plan.rounds):
        for threads in THREADS:
            settings = BenchSettings(threads=threads, runs=plan.runs, warmup=plan.warmup)
            for label in labels:
                if "error" in out[label]:
                    continue
                try:
                    feed = make_feed(paths[label], settings, data=feed_path)
                    result = benchmark_model(paths[label], feed, settings)
                except Exception as error:  # a model ORT cannot run is a row's error
                    out[label]["error"] = f"latency: {_one_line(error)}"
                    continue
                p50s.setdefault((label, threads), []).append(result.p50_ms)
                p90s.setdefault((label, threads), []).append(result.p90_ms)
                out[label]["integer_kernels"] = result.integer_kernels
                out[label]["float_islands"] = list(result.float_islands)
        print(f"  latency round {round_index + 1}/{plan.rounds} done", flush=True)
    for label in labels:
        if "error" in out[label]:
            continue
        for threads in THREADS:
            mine = p50s[(label, threads)]
            base = None if "error" in out[reference] else p50s.get((reference, threads))
            ratio = (statistics.median(m / b for m, b in zip(mine, base, strict=True))
                     if base else float("nan"))
            out[label][str(threads)] = {"p50_ms": statistics.median(mine),
                                        "p90_ms": statistics.median(p90s[(label, threads)]),
                                        "ratio": ratio}
    return out


# --- the run --------------------------------------------------------------------------------------


def selected_rows(tools: list[str] | None) -> list[RowSpec]:
    """Rows matched by any filter: a family name (onnxq, ORT, NNCF) or a label glob, ignoring
    case. A filter that matches no row is an error."""
    if not tools:
        return list(ROWS)
    chosen = set()
    for token in tools:
        token = token.lower()
        matched = {row.label for row in ROWS
                   if token == row.family.lower() or fnmatch.fnmatch(row.label.lower(), token)}
        if not matched:
            raise ValueError(f"--tools {token!r} matches no row; families: {', '.join(FAMILIES)}; "
                             f"rows: {', '.join(row.label for row in ROWS)}")
        chosen |= matched
    return [row for row in ROWS if row.label in chosen]


def run_model(name: str, rows: list[RowSpec], feeds: int, plan: LatencyPlan, work: Path,
              logs: Path, limits: Limits) -> dict[str, Any]:
    from onnxq import zoo
    from onnxq.report.bench import model_file_bytes

    entry = zoo.get(name)
    built = entry.build(zoo.default_cache_dir())
    calib = work / name / "calib"
    feed_files = calibration_folder(built.calib_dir, feeds, calib)
    shapes_vary = len({tuple(sorted(_feed_shapes(p).items())) for p in feed_files}) > 1
    latency_feed = latency_feed_path(feed_files)
    float_bytes = model_file_bytes(built.onnx_path)
    print(f"{name}: {len(feed_files)} calibration feeds ({'varying' if shapes_vary else 'one'} shape), "
          f"latency feed {latency_feed.name} {_feed_shapes(latency_feed)}", flush=True)

    records: list[dict[str, Any]] = [{"label": "float", "family": "float",
                                      "metrics": entry.evaluate(built.onnx_path, built),
                                      "file_bytes": float_bytes, "size_ratio": 1.0}]
    paths = {"float": built.onnx_path}
    (logs / name).mkdir(parents=True, exist_ok=True)
    for spec in rows:
        if not spec.applies(name, shapes_vary):
            continue
        slug = "".join(c if c.isalnum() else "_" for c in spec.label)
        target = work / name / f"{slug}.onnx"
        record: dict[str, Any] = {"label": spec.label, "family": spec.family, "quantizer": spec.quantizer,
                                  "options": dict(spec.options)}
        record.update(quantize_isolated(spec, built.onnx_path, target, calib, name,
                                        logs / name / f"{slug}.log", limits))
        if "error" not in record:
            record.update(calibration_side(target))
            try:
                record["metrics"] = entry.evaluate(target, built)
                record["file_bytes"] = model_file_bytes(target)
                record["size_ratio"] = record["file_bytes"] / float_bytes
                paths[spec.label] = target
            except Exception as error:  # written but unusable: ORT cannot load or run it
                record["error"] = f"evaluate: {_one_line(error)}"
                record["trace"] = traceback.format_exc(limit=-4)
        records.append(record)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()
                 if k not in ("trace", "options", "family", "quantizer")}
        print(f"  {shown}", flush=True)

    latency = measure_latency(paths, latency_feed, plan)
    for record in records:
        record.update(latency.get(record["label"], {}))
    return {"primary_metric": entry.primary_metric, "date": _now(), "feeds": len(feed_files),
            "shapes_vary": shapes_vary,
            "latency_feed": {"file": latency_feed.name,
                             "shapes": {k: list(v) for k, v in _feed_shapes(latency_feed).items()}},
            "rows": records}


# --- machine ---------------------------------------------------------------------------------------


def calibration_side(target: Path) -> dict[str, Any]:
    """From an onnxq card next to the model: its held-out fidelity on calibration feeds and,
    after a scale search, the search's loss on its selection feeds before and after and its final
    acceptance against the base scales (the calibration side of the calibration-vs-evaluation
    gap)."""
    card_path = target.with_suffix(".card.json")
    if not card_path.exists():
        return {}
    card = json.loads(card_path.read_text())
    outputs = card.get("fidelity", {}).get("outputs", [])
    found: dict[str, Any] = {}
    if outputs:
        found["heldout_cosine"] = min(o["cosine"] for o in outputs)
    blocks = card.get("search", {}).get("blocks", [])
    scored = [b for b in blocks if b.get("selection_before") is not None]
    if blocks:  # global loss: each block starts from what the earlier ones kept
        last = blocks[-1]
        final = last["loss_after"] if last["kept"] else last["loss_before"]
        found["search_loss"] = [blocks[0]["loss_before"], final]
        found["blocks_kept"] = f"{sum(b['kept'] for b in blocks)}/{len(blocks)}"
    acceptance = card.get("search", {}).get("acceptance")
    if acceptance:  # the final check against the base scales on the held-out calibration feeds
        found["search_accepted"] = acceptance["accepted"]
        found["acceptance_cosine"] = [acceptance["base_cosine"], acceptance["searched_cosine"]]
    if scored:
        found["selection_loss"] = [scored[0]["selection_before"],
                                   next((b["selection_after"] for b in reversed(scored) if b["kept"]),
                                        scored[0]["selection_before"])]
    return found


def merged_rows(previous: dict[str, Any] | None, fresh: dict[str, Any]) -> dict[str, Any]:
    """A model's fresh results, keeping the previous rows that were not re-run (--merge) and
    still exist, in the order of ROWS; a kept row is marked with the date of the run that made
    it (`earlier_run`: its latency ratios were measured against that run's float model)."""
    if not previous:
        return fresh
    rows = {row["label"]: {**row, "earlier_run": row.get("earlier_run", previous.get("date"))}
            for row in previous["rows"] if row["label"] in ROW_BY_LABEL}
    rows.update({row["label"]: row for row in fresh["rows"]})
    order = {label: index for index, label in enumerate(["float", *ROW_BY_LABEL])}
    fresh["rows"] = sorted(rows.values(), key=lambda row: order.get(row["label"], len(order)))
    return fresh


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


INTEGER_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def _cpu_flags() -> list[str]:
    """The CPU's integer-matmul instruction sets (what ORT's int8 kernels can use)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [flag for flag in INTEGER_ISA if flag in flags]
    except OSError:
        pass
    return []


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "isa": _cpu_flags(),
            "python": platform.python_version(),
            **{name: _version(name) for name in ("onnxruntime", "onnx", "onnx-ir", "nncf", "numpy")},
            "onnxq": _git_revision()}


# --- command line ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"zoo models (default: all; --quick: digits): {', '.join(ZOO_MODELS)}")
    parser.add_argument("--tools", nargs="+", metavar="TOOL",
                        help="rows to run: families (onnxq, ORT, NNCF) or label globs ('ORT *', "
                             "'onnxq default'); default: all")
    parser.add_argument("--feeds", type=int, default=None, help="calibration feeds (default 64; --quick 8)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: digits only unless models are given, 8 feeds, one short "
                             "latency round; writes to results/quick/")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other models' entries of an existing results.json")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds one quantization may take (default 1800)")
    parser.add_argument("--max-rss-gb", type=float, default=12,
                        help="resident memory one quantization may take (default 12 GB)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved latency rounds (default 3; --quick 1)")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed runs per model and round (default 10; --quick 5)")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    args = parser.parse_args(argv)

    if args.list:
        for row in ROWS:
            where = "all models" if row.models is None else ", ".join(sorted(row.models))
            extra = "; only when feeds vary in shape" if row.only_varying_shapes else ""
            print(f"{row.label:32} {row.quantizer:12} {where}{extra}  {dict(row.options)}")
        return
    unknown = [m for m in args.models if m not in ZOO_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ZOO_MODELS)}")
    models = args.models or (["digits"] if args.quick else list(ZOO_MODELS))
    feeds = args.feeds or (8 if args.quick else 64)
    plan = LatencyPlan(rounds=1, runs=5, warmup=1) if args.quick else LatencyPlan()
    plan = LatencyPlan(rounds=args.rounds or plan.rounds, runs=args.runs or plan.runs, warmup=plan.warmup)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    try:
        rows = selected_rows(args.tools)
    except ValueError as error:
        parser.error(str(error))

    from reporting import write_reports

    report: dict[str, Any] = {"machine": machine(), "date": _now(), "command": " ".join(sys.argv),
                              "feeds": feeds, "latency": {**plan.__dict__, "threads": list(THREADS)},
                              "models": {}}
    previous = out / "results.json"
    if args.merge and previous.exists():
        report["models"] = json.loads(previous.read_text())["models"]
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-") as folder:
        for name in models:
            fresh = run_model(name, rows, feeds, plan, Path(folder), logs,
                              Limits(args.timeout, args.max_rss_gb * 1024))
            report["models"][name] = merged_rows(report["models"].get(name), fresh)
            shutil.rmtree(Path(folder) / name, ignore_errors=True)
            write_reports(report, out)  # after every model: a long run leaves partial results
    print(f"done in {time.perf_counter() - start:.0f} s; wrote {out}", flush=True)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
