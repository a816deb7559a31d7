"""sha256 of the model files `onnxq quantize` writes, for a fixed set of models and settings.

A refactoring that must not change behaviour is checked by recording the hashes before and
comparing after:

    python benchmarks/output_hashes.py --out before.json            # on the old code
    python benchmarks/output_hashes.py --check benchmarks/results/output_hashes.json

Models: the bundled digit CNN and every zoo model (built into the zoo cache if needed); settings:
the default config, `--method comq --weight-bits 4` and `--avg-bits 4`, each with
`--no-reduce-range` (so that the hashes do not depend on the CPU's VNNI). The recorded hashes
are of 2026-11-29 (channel equalization and the dead-channel bias fit included), `comq_w4`
and `avg_bits_4` re-recorded 2026-11-30 (short rows at 8 bits, the uniform check, int2
containers, container bits in `avg_bits`; PP-OCRv4's default: written-out HardSwish fused). Each run is a
fresh `onnxq quantize` process. Only the model file is hashed: its card holds timings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"default": [], "comq_w4": ["--method", "comq", "--weight-bits", "4"],
            "avg_bits_4": ["--avg-bits", "4"]}


def _models(names: list[str]) -> dict[str, tuple[Path, Path]]:
    models = {"bundled_digit_cnn": (REPO / "models/bundled/digit_cnn.onnx",
                                    REPO / "models/bundled/digit_cnn_calib.npz")}
    from onnxq import zoo

    for name in names:
        built = zoo.get(name).build(zoo.default_cache_dir())
        models[name] = (built.onnx_path, built.calib_dir)
    return models


def output_hash(model: Path, calib: Path, flags: list[str], folder: Path) -> str:
    out = folder / "out.onnx"
    command = ["onnxq", "quantize", str(model), str(out), "--calib", str(calib), "--quiet",
               "--no-reduce-range", *flags]
    subprocess.run(command, check=True)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", nargs="*",
                        default=["digits", "efficientnet_lite0", "minilm_l6", "ppocr_rec"])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--out", type=Path, help="write the hashes here (JSON)")
    parser.add_argument("--check", type=Path, help="compare with the hashes recorded in this file")
    args = parser.parse_args()
    hashes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (model, calib) in _models(args.zoo).items():
            for setting in args.settings:
                key = f"{name}/{setting}"
                hashes[key] = output_hash(model, calib, SETTINGS[setting], Path(folder))
                print(key, hashes[key], flush=True)
    if args.out:
        args.out.write_text(json.dumps(hashes, indent=2) + "\n")
    if args.check:
        recorded = json.loads(args.check.read_text())
        differ = [key for key in hashes if recorded.get(key) != hashes[key]]
        for key in differ:
            print(f"DIFFERS {key}: recorded {recorded.get(key)}, now {hashes[key]}")
        print(f"{len(hashes) - len(differ)} of {len(hashes)} identical")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
