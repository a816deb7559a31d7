"""Quantizing a model past protobuf's 2 GB limit: wall time, peak memory, size and fidelity.

    python benchmarks/large_model.py                    # build, quantize, write results/large_model.json
    python benchmarks/large_model.py --model-dir DIR    # reuse a model built by
                                                        # python -m onnxq.zoo.large_transformer DIR

The model is `models/large_transformer.py` at its default size (553M float32 parameters, 2.2 GB
in an external-data file, 8 calibration feeds of which onnxq holds 4 out). The quantization is
the command a user runs, `python -m onnxq quantize IN OUT --calib DIR --json`, in a child
process; its peak resident memory is the child's own `ru_maxrss` (os.wait4), which counts every
page it touched, ONNX Runtime's sessions and mapped files included. Sizes are bytes on disk,
model file plus external data; fidelity is the quantize summary's cosine to the float model on
the held-out feeds. Build and output go to a temporary folder (about 5 GB) removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run import RESULTS, machine

from onnxq import model_io
from onnxq.zoo import large_transformer


def files_bytes(model_path: Path) -> int:
    """Bytes on disk of a model file and the external-data file beside it (if any)."""
    data = model_path.with_name(model_io.external_data_name(model_path))
    return model_path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def quantize_in_child(model: Path, calib: Path, out: Path, logs: Path) -> dict[str, Any]:
    """Run the CLI in a child process; its wall time, peak RSS, exit code and JSON summary."""
    command = [sys.executable, "-m", "onnxq", "quantize", str(model), str(out), "--calib", str(calib),
               "--json"]
    stdout, stderr = logs / "quantize.json", logs / "quantize.err"
    start = time.perf_counter()
    with open(stdout, "w") as out_handle, open(stderr, "w") as err_handle:
        child = subprocess.Popen(command, stdout=out_handle, stderr=err_handle)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"onnxq quantize failed ({child.returncode}): {stderr.read_text()[-2000:]}")
    return {"wall_s": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024,  # ru_maxrss is in KiB on Linux
            "summary": json.loads(stdout.read_text())}


def measure(model_dir: Path, work: Path) -> dict[str, Any]:
    model = model_dir / f"{large_transformer.NAME}.onnx"
    out = work / "out" / "large_transformer.int8.onnx"
    run = quantize_in_child(model, model_dir / "calib", out, work)
    summary = run["summary"]
    float_bytes, quantized_bytes = files_bytes(model), files_bytes(out)
    outputs = summary["fidelity"]["outputs"]
    return {
        "model": {"parameters": large_transformer.TransformerShape().parameters, "float_bytes": float_bytes,
                  "external_data": model_io.has_external_data(model)},
        "wall_s": round(run["wall_s"], 1),
        "peak_rss_bytes": run["peak_rss_bytes"],
        "peak_rss_over_model": round(run["peak_rss_bytes"] / float_bytes, 2),
        "quantized_bytes": quantized_bytes,
        "size_ratio": round(quantized_bytes / float_bytes, 4),
        "output_external_data": model_io.has_external_data(out),
        "cosine": min(o["cosine"] for o in outputs),
        "fidelity": {"feeds": summary["fidelity"]["feeds"], "held_out": summary["fidelity"]["held_out"],
                     "outputs": outputs},
        "quantized_ops": summary["quantized_ops"],
        "stage_seconds": summary["seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path,
                        help="a built model (default: build one in a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "large_model.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="onnxq-large-"))
    try:
        model_dir = args.model_dir
        build_s = None
        if model_dir is None:
            model_dir = work / "model"
            start = time.perf_counter()
            large_transformer.build(model_dir)
            build_s = round(time.perf_counter() - start, 1)
        figures = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "build_s": build_s,
                   **measure(model_dir, work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model_io.write_text_atomic(args.out, json.dumps(figures, indent=2) + "\n")
    print(f"float {figures['model']['float_bytes'] / 1e9:.2f} GB -> "
          f"{figures['quantized_bytes'] / 1e9:.2f} GB ({figures['size_ratio']:.3f}x), "
          f"cosine {figures['cosine']:.4f}, {figures['wall_s']:.0f} s, peak RSS "
          f"{figures['peak_rss_bytes'] / 1e9:.2f} GB ({figures['peak_rss_over_model']:.2f}x the model); "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
