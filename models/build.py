"""Build zoo models into the cache and, with ``--eval``, score their float models.

    python -m onnxq.zoo.build                      # all models into the default cache
    python -m onnxq.zoo.build digits ppocr_rec --eval
    python -m onnxq.zoo.build --cache /tmp/zoo --n-calib 1000 efficientnet_lite0
    python -m onnxq.zoo.build --write-bundled      # regenerate models/bundled/ (digit CNN)

A model already built with the same recipe is not rebuilt (delete its folder to force it).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from . import ZOO, default_cache_dir, digits, get
from .common import build_info, feed_paths


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m onnxq.zoo.build", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "names", nargs="*", help=f"models to build (default: all of {', '.join(ZOO)})"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default: $ONNXQ_ZOO_DIR or .zoo)"
    )
    parser.add_argument("--eval", action="store_true", help="evaluate each float model")
    parser.add_argument("--n-calib", type=int, default=64, help="calibration feeds per model")
    parser.add_argument(
        "--write-bundled",
        action="store_true",
        help="re-export the committed digit CNN files in models/bundled/ (needs torch) and exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in ZOO]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(ZOO)}")
    return args


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.write_bundled:
        digits.write_bundled()
        print(f"wrote {digits.BUNDLED_ONNX}, {digits.BUNDLED_CALIB}, {digits.BUNDLED_EVAL}")
        return 0
    cache = args.cache or default_cache_dir()
    for name in args.names or list(ZOO):
        model = get(name)
        start = time.perf_counter()
        built = model.build(cache, n_calib=args.n_calib)
        seconds = time.perf_counter() - start
        info = build_info(built)
        print(f"{name}: {built.onnx_path} ({_size_mb(built.onnx_path):.1f} MB)")
        print(
            f"  built in {info['build_seconds']:.1f} s (this call {seconds:.1f} s); "
            f"{len(feed_paths(built.calib_dir))} calibration feeds in {built.calib_dir}"
        )
        if args.eval:
            start = time.perf_counter()
            metrics = model.evaluate(built.onnx_path, built)
            seconds = time.perf_counter() - start
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            print(f"  float metrics ({seconds:.1f} s; primary {model.primary_metric}): {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
