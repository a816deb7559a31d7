"""W8A8 side by side: onnxq (each calibration method) against ONNX Runtime's quantize_static.

For every zoo model, on the same calibration feeds and the same evaluation data:

- float: the zoo metrics of the float model;
- ORT quantize_static, QDQ, per-channel int8 weights, uint8 activations, with MinMax, Entropy
  and Percentile calibration (a peer that fails is a row with its error);
- onnxq with its default config and with each calibration method.

Each row records the zoo metrics, quantization wall time, file size ratio and peak resident
memory of the process that quantized (each quantization runs in its own child process, so
memory figures do not mix). Writes benchmarks/results/w8a8.json and w8a8.md.

    python benchmarks/w8a8.py [models...] [--feeds N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import tempfile
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _padded(feeds: list[dict]) -> list[dict]:
    """Feeds zero-padded at the end of every axis to one common shape (what ORT's histogram
    calibrators need: they stack all feeds). Zero is the padding of the zoo's own
    pre-processing (normalized image width) and of a text model's ids and attention mask."""
    import numpy as np

    padded = []
    for feed in feeds:
        row = {}
        for name, array in feed.items():
            target = np.max([f[name].shape for f in feeds], axis=0)
            row[name] = np.pad(array, [(0, t - s) for s, t in zip(array.shape, target, strict=True)])
        padded.append(row)
    return padded


def _ort_quantize(source: Path, target: Path, calib_dir: Path, method: str, feeds: int) -> None:
    import numpy as np
    import onnx
    import onnx.version_converter
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    pad = method.endswith("+pad")
    method = method.removesuffix("+pad")
    data = [dict(np.load(path)) for path in sorted(calib_dir.glob("*.npz"))[:feeds]]
    data = _padded(data) if pad else data

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(data)

        def get_next(self):
            return next(self.feeds, None)

    # The pre-processing a careful ORT user does: weights held in Constant nodes become
    # initializers (ORT only quantizes initializers) and the opset is raised to 13 (per-channel
    # QDQ); ORT does neither by itself.
    model = ir.from_proto(onnx.load(str(source)))
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    model = ir.to_proto(model)
    model.ir_version = min(model.ir_version, 10)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        model = onnx.version_converter.convert_version(model, 13)
    source = target.with_suffix(".prepared.onnx")
    onnx.save(model, str(source))
    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))


def _onnxq_quantize(source: Path, target: Path, calib_dir: Path, method: str | None,
                    feeds: int) -> None:
    import onnxq

    config = onnxq.QuantConfig(max_feeds=feeds)
    if method is not None:
        config = config.replace(method=onnxq.CalibrationMethod(method))
    onnxq.quantize(source, calib_dir, config).save(target)


def _child(queue, tool: str, method: str | None, source: Path, target: Path, calib: Path,
           feeds: int) -> None:
    try:
        start = time.perf_counter()
        if tool == "ort":
            _ort_quantize(source, target, calib, method, feeds)
        else:
            _onnxq_quantize(source, target, calib, method, feeds)
        seconds = time.perf_counter() - start
        peak_mb = _peak_rss_mb()
        queue.put({"seconds": seconds, "peak_rss_mb": peak_mb})
    except Exception as error:  # a failing peer is a row, not a crash
        queue.put({"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}",
                   "trace": traceback.format_exc(limit=3)})


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _run_isolated(tool, method, source, target, calib, feeds) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, tool, method, source, target, calib,
                                                   feeds))
    process.start()
    result = queue.get()
    process.join()
    return result


ROWS = [("onnxq", None, "onnxq default")] + [
    ("onnxq", m, f"onnxq {m}") for m in ("minmax", "percentile", "entropy", "mse")
] + [("ort", m, f"ORT {m}") for m in ("MinMax", "Entropy", "Percentile")] + [
    ("ort", f"{m}+pad", f"ORT {m} (padded feeds)") for m in ("MinMax", "Entropy", "Percentile")]


def run(models: list[str], feeds: int) -> dict:
    from onnxq import zoo

    report = {"machine": {"cpu": _cpu_name(), "cores": multiprocessing.cpu_count(),
                          "python": platform.python_version()},
              "feeds": feeds, "models": {}}
    for name in models:
        entry = zoo.get(name)
        built = entry.build(zoo.default_cache_dir())
        float_bytes = built.onnx_path.stat().st_size
        rows = [{"tool": "float", "metrics": entry.evaluate(built.onnx_path, built),
                 "size_ratio": 1.0}]
        with tempfile.TemporaryDirectory() as folder:
            for tool, method, label in ROWS:
                if "padded" in label and not _shapes_vary(built.calib_dir):
                    continue
                target = Path(folder) / f"{label.replace(' ', '_')}.onnx"
                result = _run_isolated(tool, method, built.onnx_path, target, built.calib_dir, feeds)
                row = {"tool": label, **result}
                if "error" not in result:
                    row["metrics"] = entry.evaluate(target, built)
                    row["size_ratio"] = target.stat().st_size / float_bytes
                rows.append(row)
                print(name, label, {k: v for k, v in row.items() if k != "trace"}, flush=True)
        report["models"][name] = {"primary_metric": entry.primary_metric, "rows": rows}
    return report


def _shapes_vary(calib_dir: Path) -> bool:
    import numpy as np

    shapes = {tuple((k, v.shape) for k, v in np.load(p).items()) for p in calib_dir.glob("*.npz")}
    return len(shapes) > 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [f"W8A8 on {machine['cpu']} ({machine['cores']} cores), {report['feeds']} "
             f"calibration feeds.", ""]
    for name, model in report["models"].items():
        metric_names = list(model["rows"][0]["metrics"])
        lines.append(f"### {name} (primary: {model['primary_metric']})")
        lines.append("")
        lines.append("| tool | " + " | ".join(metric_names) + " | size | time s | peak MB |")
        lines.append("|---" * (len(metric_names) + 4) + "|")
        for row in model["rows"]:
            if "error" in row:
                lines.append(f"| {row['tool']} | failed: {row['error']} |" + " |" * (len(metric_names) + 2))
                continue
            values = " | ".join(f"{row['metrics'][m]:.4f}" for m in metric_names)
            seconds = f"{row['seconds']:.1f}" if "seconds" in row else "-"
            peak = f"{row['peak_rss_mb']:.0f}" if "peak_rss_mb" in row else "-"
            lines.append(f"| {row['tool']} | {values} | {row['size_ratio']:.3f} | {seconds} | {peak} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*",
                        default=["digits", "efficientnet_lite0", "minilm_l6", "ppocr_rec"])
    parser.add_argument("--feeds", type=int, default=64)
    args = parser.parse_args()
    report = run(args.models, args.feeds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "w8a8" if len(args.models) == 4 else "w8a8_" + "_".join(args.models)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
