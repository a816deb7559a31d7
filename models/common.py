"""Shared pieces of the model zoo: the registry records, the cache layout and small helpers.

Every zoo model is built into its own folder of the cache::

    <cache>/<name>/<name>.onnx     the float model (weights inside the file)
    <cache>/<name>/calib/          calibration feeds, one ``feed_NNN.npz`` per model run
    <cache>/<name>/eval/           evaluation inputs and the float model's reference outputs
    <cache>/<name>/build.json      stamp written last: a build is complete only when it exists

A calibration feed holds one array per graph input, named like the input and shaped exactly as
the model takes it for one run (batch dimension included), so a quantizer can feed
``dict(np.load(path))`` straight to ``InferenceSession.run``.

Evaluation only needs numpy, scipy and onnxruntime: the inputs and float reference outputs are
cached in ``eval/`` at build time, so a quantized model can be scored without torch or the
packages that carry the source data.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnxruntime

logger = logging.getLogger(__name__)

STAMP_NAME = "build.json"
FEED_PREFIX = "feed_"


@dataclass(frozen=True)
class BuiltModel:
    """Where a built zoo model lies: the float ONNX file and its calibration/evaluation data."""

    name: str
    onnx_path: Path
    calib_dir: Path
    eval_dir: Path


@dataclass(frozen=True)
class ZooModel:
    """A registry entry.

    ``build(cache_dir, n_calib=64)`` writes (or finds already written) the model and its data
    and returns their paths; ``evaluate(onnx_path, built)`` runs ONNX Runtime on ``onnx_path``
    (the float model or a quantized copy with the same inputs and outputs) and returns its
    metrics.
    ``write_calib(built, out_dir, n)`` writes ``n`` calibration feeds to ``out_dir``.
    """

    name: str
    description: str
    primary_metric: str
    build: Callable[..., BuiltModel]  # (cache_dir: Path, n_calib: int = 64)
    evaluate: Callable[[Path, BuiltModel], dict[str, float]]
    write_calib: Callable[[BuiltModel, Path, int], list[Path]] | None = None


def layout(cache_dir: Path | str, name: str) -> BuiltModel:
    """The paths of model ``name`` inside ``cache_dir`` (nothing is created)."""
    root = Path(cache_dir) / name
    return BuiltModel(name, root / f"{name}.onnx", root / "calib", root / "eval")


def _stamp_path(built: BuiltModel) -> Path:
    return built.onnx_path.parent / STAMP_NAME


def is_built(built: BuiltModel, recipe: Mapping[str, Any]) -> bool:
    """True when the model and evaluation data of this ``recipe`` are already in the cache."""
    stamp = _stamp_path(built)
    if not (stamp.is_file() and built.onnx_path.is_file() and built.eval_dir.is_dir()):
        return False
    return json.loads(stamp.read_text()).get("recipe") == dict(recipe)


def build_once(
    built: BuiltModel,
    recipe: Mapping[str, Any],
    make: Callable[[BuiltModel], None],
    write_calib: Callable[[BuiltModel, Path, int], list[Path]],
    n_calib: int,
) -> BuiltModel:
    """Build a zoo model unless this ``recipe`` is already built, then make sure the
    calibration folder holds exactly ``n_calib`` feeds.

    ``make(built)`` writes the float model and the evaluation data; ``write_calib`` the feeds.
    A rebuild empties the old folders so nothing stale survives; the stamp is written last, so
    an interrupted build is redone on the next call. A different ``n_calib`` rewrites only
    the calibration folder.
    """
    if not is_built(built, recipe):
        logger.info("%s: building into %s", built.name, built.onnx_path.parent)
        start = time.perf_counter()
        _stamp_path(built).unlink(missing_ok=True)
        shutil.rmtree(built.eval_dir, ignore_errors=True)
        built.eval_dir.mkdir(parents=True)
        make(built)
        _replace_calib(built, write_calib, n_calib)
        seconds = time.perf_counter() - start
        stamp = {
            "recipe": dict(recipe),
            "build_seconds": round(seconds, 2),
            "onnx_bytes": built.onnx_path.stat().st_size,
        }
        _stamp_path(built).write_text(json.dumps(stamp, indent=2) + "\n")
        logger.info("%s: built in %.1f s", built.name, seconds)
    elif len(feed_paths(built.calib_dir)) != n_calib:
        logger.info("%s: writing %d calibration feeds", built.name, n_calib)
        _replace_calib(built, write_calib, n_calib)
    else:
        logger.debug("%s: already built in %s", built.name, built.onnx_path.parent)
    return built


def _replace_calib(
    built: BuiltModel, write_calib: Callable[[BuiltModel, Path, int], list[Path]], n: int
) -> None:
    """Write the feeds next to the calibration folder, then swap them in."""
    staging = built.calib_dir.with_name(built.calib_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    write_calib(built, staging, n)
    shutil.rmtree(built.calib_dir, ignore_errors=True)
    staging.rename(built.calib_dir)


def build_info(built: BuiltModel) -> dict[str, Any]:
    """The stamp of a complete build (recipe, build seconds, ONNX size)."""
    return json.loads(_stamp_path(built).read_text())


# --- calibration feeds -----------------------------------------------------------------------


def write_feeds(
    out_dir: Path | str, feeds: Iterable[Mapping[str, np.ndarray]], count: int
) -> list[Path]:
    """Write ``count`` feeds from ``feeds`` as ``feed_000.npz``, ... (lazily, one at a time).

    The number width grows with ``count`` so the names sort in order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(count - 1)))
    paths = []
    for i, feed in enumerate(feeds):
        if i == count:
            break
        path = out_dir / f"{FEED_PREFIX}{i:0{width}d}.npz"
        np.savez(path, **feed)
        paths.append(path)
    if len(paths) != count:
        raise ValueError(f"asked for {count} feeds, the source gave {len(paths)}")
    return paths


def feed_paths(calib_dir: Path | str) -> list[Path]:
    """The feed files of a calibration folder, in order."""
    return sorted(Path(calib_dir).glob(f"{FEED_PREFIX}*.npz"))


def load_feeds(calib_dir: Path | str) -> list[dict[str, np.ndarray]]:
    """All feeds of a calibration folder, as dicts ready for ``InferenceSession.run``."""
    feeds = []
    for path in feed_paths(calib_dir):
        with np.load(path) as data:
            feeds.append({key: data[key] for key in data.files})
    return feeds


# --- source data ------------------------------------------------------------------------------


def gensim_data_dir() -> Path:
    """gensim's bundled ``test/test_data`` folder (text corpora and word-similarity sets)."""
    return package_dir("gensim") / "test" / "test_data"


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed (pip install 'onnxq[zoo]')")
    return Path(next(iter(spec.submodule_search_locations)))


# --- ONNX and ONNX Runtime -------------------------------------------------------------------


def export_single_input(net: Any, example_shape: tuple[int, ...], onnx_path: Path, input_name: str,
                        output_name: str) -> Path:
    """torch.onnx.export with the legacy exporter (weights inside the file), opset 17, a dynamic
    batch axis on the one input and output; then `check_onnx`."""
    import torch

    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        net,
        (torch.zeros(*example_shape),),
        str(onnx_path),
        dynamo=False,
        opset_version=17,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
    )
    check_onnx(onnx_path)
    return onnx_path


def check_onnx(onnx_path: Path) -> None:
    """Fail early unless the file is a valid, self-contained model every onnxruntime >= 1.20
    reads (IR version 10 at most, no external weights)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    onnx.checker.check_model(model)
    if model.ir_version > 10:
        raise ValueError(f"{onnx_path}: IR version {model.ir_version} is too new for ORT 1.20")
    external = [t.name for t in model.graph.initializer if t.data_location == t.EXTERNAL]
    if external:
        raise ValueError(f"{onnx_path}: weights stored outside the file: {external[:3]}")


def ort_session(onnx_path: Path | str) -> onnxruntime.InferenceSession:
    """A CPU session with all graph optimizations, the way the zoo evaluates every model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def run_batched(
    session: onnxruntime.InferenceSession, name: str, x: np.ndarray, batch: int = 32
) -> np.ndarray:
    """Run a single-input model over ``x`` in batches and stack the first output.

    A model whose batch dimension is pinned to 1 (a quantizer may do that) runs one by one.
    """
    if next(i.shape[0] for i in session.get_inputs() if i.name == name) == 1:
        batch = 1
    outputs = [session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outputs)


# --- metrics ---------------------------------------------------------------------------------


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def top1_agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of rows whose argmax matches the reference's argmax."""
    return float(np.mean(logits.argmax(axis=1) == reference.argmax(axis=1)))
