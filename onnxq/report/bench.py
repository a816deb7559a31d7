"""Latency, throughput, load time and size of ONNX models under ONNX Runtime, side by side.

Quantization is done for speed and size, so both are measured the way a deployment sees
them: the file on disk (external-data files included), the time to create an
`InferenceSession` from it, and the wall time of `session.run` on one fixed feed, after
`warmup` untimed runs, with `threads` intra-op threads and one inter-op thread (sequential
execution). The feed is built once and given unchanged to every model compared, so that only
the model differs. Latency is reported as the median (p50) and 90th percentile of the timed
runs; throughput is samples per second, `batch / mean latency`.

Feeds (`make_feed`) come from the model's declared inputs, in this order of precedence:

1. `BenchSettings.shapes`: a full shape for an input (its fixed dims must agree with the model);
2. axis 0 when it is symbolic or unknown: `BenchSettings.batch`, or 1;
3. dims the model fixes;
4. any other symbolic or unknown dim: 128 when its name speaks of a sequence (seq, len,
   token, time, step) or the input has rank <= 3 (text, audio frames); 224 otherwise (the
   spatial dims of image inputs of rank >= 4).

Values: floats are standard normal; integers are in [0, 100) (token ids that fit any
vocabulary), except inputs named like *mask* (ones) and *type*/*segment* (zeros, the one
token type every model has); booleans are True. With a `.npz` file instead, each input takes
the first `batch` samples of its array on axis 0 (a single feed of exactly that batch passes
unchanged), checked against the model with `onnxq.data.check_feed`.

Integer kernels are counted on the graph ORT's CPU execution provider builds after its
optimizations (`onnxq.report.kernels`): what really runs in integers, not what the QDQ graph
promises. The float islands of that graph (a float op between a DequantizeLinear and a
QuantizeLinear, where a fusion was missed) are listed by op type and node name. With
`provider="cuda"` the times include copying inputs to and outputs from the GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.data import InputSpec, _read_npz, check_feed, model_input_specs
from onnxq.errors import CalibrationDataError, ConfigError, ModelError, OnnxqError
from onnxq.model_io import external_data_files, load_model
from onnxq.report.kernels import float_islands, integer_kernel_counts, op_counts, optimized_graph
from onnxq.scoring import latency, sessions
from onnxq.scoring.sessions import PROVIDERS, SessionSettings

logger = logging.getLogger(__name__)

SEQUENCE_DIM = 128
SPATIAL_DIM = 224
TOKEN_ID_LIMIT = 100
_SEQUENCE_NAME = re.compile(r"seq|len|token|time|step", re.IGNORECASE)

Feed = dict[str, np.ndarray]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class BenchSettings:
    """How a model is timed and what shape of feed it is given."""

    threads: int = 1  # intra-op threads; inter-op 1
    provider: str = "cpu"  # "cpu" or "cuda" (CUDAExecutionProvider)
    warmup: int = 5
    runs: int = 50
    batch: int | None = None  # overrides a symbolic or unknown axis 0 of every input
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # per-input full shapes

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        if self.runs < 1:
            raise ConfigError(f"runs must be at least 1, got {self.runs}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be 0 or more, got {self.warmup}")
        if self.provider not in PROVIDERS:
            raise ConfigError(f"unknown provider {self.provider!r}; choose one of "
                              f"{', '.join(PROVIDERS)}")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"batch must be at least 1, got {self.batch}")
        names = [name for name, _ in self.shapes]
        if len(set(names)) != len(names):
            raise ConfigError(f"a shape is given twice for input(s) "
                              f"{', '.join(sorted({n for n in names if names.count(n) > 1}))}")
        for name, dims in self.shapes:
            if not all(isinstance(d, int) and d >= 1 for d in dims):
                raise ConfigError(f"shape of input {name} must be positive integers, got {list(dims)}")


@dataclass(frozen=True)
class BenchResult:
    """One model's measurements; times in seconds or milliseconds as named."""

    model: str
    file_bytes: int  # the .onnx plus any external-data files it references
    load_seconds: float  # InferenceSession creation
    batch: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    throughput_per_s: float  # samples per second = batch / mean latency
    provider: str
    threads: int
    integer_kernels: dict[str, int]  # from ORT's optimized graph (onnxq.report.kernels)
    float_islands: tuple[str, ...] = ()  # "op_type node" of each DQ -> float op -> Q, same graph

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# --- feeds -------------------------------------------------------------------------------------


def make_feed(model_path: Path, settings: BenchSettings, data: Path | None = None,
              seed: int = 0) -> Feed:
    """A feed for the model: generated from its declared inputs, or read from `data` (.npz)."""
    proto = load_model(model_path)
    specs = model_input_specs(proto)
    if data is not None:
        if settings.shapes:
            raise ConfigError("shapes cannot be given with a data file: the data fixes them "
                              "(the batch picks how many samples are used)")
        takes = {spec.name: _axis0(spec, settings) for spec in specs}
        _check_batch_applies(settings, specs, takes, model_path)
        return _feed_from_file(Path(data), specs, takes)
    _check_shape_names(settings, specs, model_path)
    shapes = {spec.name: _feed_shape(spec, _dim_names(proto, spec.name), settings) for spec in specs}
    _check_batch_applies(settings, specs, {n: s[0] if s else None for n, s in shapes.items()},
                         model_path)
    rng = np.random.default_rng(seed)
    return {spec.name: _generated_array(spec, shapes[spec.name], rng) for spec in specs}


def _axis0(spec: InputSpec, settings: BenchSettings) -> int | None:
    """Size of axis 0 in the feed: fixed by the model, else the batch (None for a scalar)."""
    if spec.shape is not None and not spec.shape:
        return None
    if spec.shape is not None and _fixed(spec.shape[0]):
        return spec.shape[0]
    return settings.batch or 1


def _check_shape_names(settings: BenchSettings, specs: Sequence[InputSpec], model_path: Path) -> None:
    known = {spec.name for spec in specs}
    unknown = [name for name, _ in settings.shapes if name not in known]
    if unknown:
        raise ConfigError(f"shape given for {', '.join(unknown)}, which {model_path} does not take "
                          f"(its inputs are {', '.join(sorted(known))})")


def _dim_names(proto: onnx.ModelProto, input_name: str) -> tuple[str, ...]:
    """The symbolic names (dim_param, '' when none) of an input's dims."""
    for value in proto.graph.input:
        if value.name == input_name:
            return tuple(d.dim_param for d in value.type.tensor_type.shape.dim)
    return ()


def _feed_shape(spec: InputSpec, dim_names: Sequence[str], settings: BenchSettings) -> Shape:
    override = dict(settings.shapes).get(spec.name)
    if override is not None:
        shape = _checked_override(spec, tuple(override))
        symbolic_axis0 = spec.shape is None or not _fixed(spec.shape[0])
        if settings.batch is not None and shape and symbolic_axis0 and shape[0] != settings.batch:
            raise ConfigError(f"shape {list(shape)} for input {spec.name} contradicts batch "
                              f"{settings.batch} on axis 0")
        return shape
    if spec.shape is None:
        raise ModelError(f"input {spec.name} has no declared shape; give it one "
                         f"(--shape {spec.name}=D1,D2,...)")
    rank = len(spec.shape)
    return tuple(
        dim if _fixed(dim) else (settings.batch or 1) if axis == 0 else _default_dim(name, rank)
        for axis, (dim, name) in enumerate(zip(spec.shape, dim_names or [""] * rank, strict=True))
    )


def _fixed(dim: int | None) -> bool:
    return dim is not None and dim > 0


def _default_dim(dim_name: str, rank: int) -> int:
    if _SEQUENCE_NAME.search(dim_name) or rank <= 3:
        return SEQUENCE_DIM
    return SPATIAL_DIM


def _checked_override(spec: InputSpec, shape: Shape) -> Shape:
    if spec.shape is None:
        return shape
    if len(shape) != len(spec.shape):
        raise ConfigError(f"shape {list(shape)} for input {spec.name} has rank {len(shape)}, the "
                          f"model takes rank {len(spec.shape)} ({_shape_text(spec.shape)})")
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if _fixed(want) and got != want:
            raise ConfigError(f"shape {list(shape)} for input {spec.name}: axis {axis} is fixed at "
                              f"{want} in the model ({_shape_text(spec.shape)})")
    return shape


def _check_batch_applies(settings: BenchSettings, specs: Sequence[InputSpec],
                         axis0: Mapping[str, int | None], model_path: Path) -> None:
    """A batch that no input can take is an error, not a silent batch of 1."""
    if settings.batch is None or settings.batch in axis0.values():
        return
    declared = ", ".join(f"{s.name} {_shape_text(s.shape)}" for s in specs)
    raise ConfigError(f"batch {settings.batch}: no input of {model_path} has a symbolic axis 0 "
                      f"({declared}); give full shapes instead")


def _shape_text(shape: Sequence[int | None] | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join(str(d) if _fixed(d) else "?" for d in shape) + "]"


def _generated_array(spec: InputSpec, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    name = spec.name.lower()
    kind = spec.dtype.kind
    if kind == "f" or spec.dtype.name == "bfloat16":
        return rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
    if kind in "iu":
        if "mask" in name:
            return np.ones(shape, dtype=spec.dtype)
        if "type" in name or "segment" in name:
            return np.zeros(shape, dtype=spec.dtype)
        return rng.integers(0, TOKEN_ID_LIMIT, size=shape).astype(spec.dtype)
    if kind == "b":
        return np.ones(shape, dtype=bool)
    raise ConfigError(f"input {spec.name} has dtype {spec.dtype}, for which no data can be made up; "
                      f"give a data file")


def _feed_from_file(path: Path, specs: Sequence[InputSpec], axis0: Mapping[str, int | None]) -> Feed:
    """The first samples of each array on axis 0, as many as the feed's axis 0 takes."""
    if not path.is_file():
        raise CalibrationDataError(f"data file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CalibrationDataError(f"data file {path} is not a .npz archive (np.savez writes one)")
    feed = {}
    for name, array in _read_npz(path).items():
        take = axis0.get(name)
        if take is not None and array.ndim >= 1:
            if len(array) < take:
                raise CalibrationDataError(f"data {path}: input {name} holds {len(array)} sample(s) "
                                           f"on axis 0, the batch needs {take}")
            array = array[:take]
        feed[name] = array
    return check_feed(feed, specs, f"data {path}")


# --- timing ------------------------------------------------------------------------------------


def benchmark_model(model_path: Path, feed: Mapping[str, np.ndarray], settings: BenchSettings) -> BenchResult:
    """Time `session.run(feed)` on one model; see the module docstring for what is measured."""
    model_path = Path(model_path)
    session_settings = _session_settings(settings)  # a provider this build lacks: ConfigError
    proto = load_model(model_path)
    specs = model_input_specs(proto)
    checked = check_feed(feed, specs, f"feed for {model_path}")
    start = time.perf_counter()
    session = _open_session(model_path, session_settings)  # first: a model ORT cannot load is a ModelError
    load_seconds = time.perf_counter() - start
    graph = optimized_graph(proto)
    kernels = integer_kernel_counts(op_counts(graph))
    islands = tuple(str(island) for island in float_islands(graph))
    del proto, graph
    times = latency.timed_runs(session, checked, settings.runs, settings.warmup, str(model_path))
    batch = _feed_batch(checked, specs)
    mean = float(np.mean(times))
    logger.info("%s: p50 %.3f ms over %d runs", model_path, np.median(times) * 1e3, len(times))
    return BenchResult(
        model=str(model_path), file_bytes=model_file_bytes(model_path), load_seconds=load_seconds,
        batch=batch, p50_ms=float(np.percentile(times, 50)) * 1e3,
        p90_ms=float(np.percentile(times, 90)) * 1e3, mean_ms=mean * 1e3,
        throughput_per_s=batch / mean if mean > 0 else float("inf"), provider=settings.provider,
        threads=settings.threads, integer_kernels=dict(sorted(kernels.items())),
        float_islands=islands)


def alternating_p50_ms(model_paths: Sequence[Path], feed: Feed, settings: BenchSettings,
                       rounds: int) -> list[float]:
    """p50 latency (ms) of each model file, timed in `rounds` alternating rounds of
    `settings.runs` runs each (onnxq.scoring.latency)."""
    timing = latency.Timing(rounds=rounds, runs=settings.runs, warmup=settings.warmup,
                            threads=settings.threads, provider=settings.provider)
    opened = [_open_session(Path(path), _session_settings(settings)) for path in model_paths]
    return latency.alternating_p50_ms(opened, feed, timing, [str(path) for path in model_paths])


def _session_settings(settings: BenchSettings) -> SessionSettings:
    """All optimizations, `threads` intra-op threads, one inter-op thread (sequential
    execution), ORT's log quiet (failures come back as exceptions, reported as one line)."""
    return SessionSettings(threads=settings.threads, provider=settings.provider,
                           optimization=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                           inter_op_threads=1, log_severity=4)


def _open_session(model_path: Path, settings: SessionSettings) -> ort.InferenceSession:
    """A session read from the file itself (as deployed: external data resolved by ORT)."""
    return sessions.open_session(model_path, str(model_path), settings, describe=sessions.tidy_line)


def _feed_batch(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> int:
    """Samples per run: axis 0 of the first input whose axis 0 is symbolic (else of the first
    input that has an axis), 1 for scalar inputs only."""
    ranked = [s for s in specs if feed[s.name].ndim >= 1]
    dynamic = [s for s in ranked if s.shape is None or not _fixed(s.shape[0])]
    chosen = (dynamic or ranked)[:1]
    return int(feed[chosen[0].name].shape[0]) if chosen else 1


def model_file_bytes(model_path: Path) -> int:
    """Bytes on disk: the model file and each external-data file it references (once each)."""
    return model_path.stat().st_size + sum((model_path.parent / name).stat().st_size
                                           for name in external_data_files(model_path))


# --- comparing models --------------------------------------------------------------------------


def check_same_inputs(paths: Sequence[Path]) -> None:
    """Models compared side by side share one feed, so they must take the same input names."""
    if not paths:
        return
    first = _input_names(Path(paths[0]))
    for path in paths[1:]:
        names = _input_names(Path(path))
        if names != first:
            raise OnnxqError(f"{path} takes inputs {', '.join(sorted(names))}, but {paths[0]} takes "
                             f"{', '.join(sorted(first))}; models compared must take the same inputs")


def _input_names(path: Path) -> frozenset[str]:
    return frozenset(spec.name for spec in model_input_specs(load_model(path)))


def ratios(results: Sequence[BenchResult]) -> list[dict[str, float]]:
    """Each result against the first: size ratio, p50 ratio, and speed-up (first p50 / p50)."""
    if not results:
        return []
    base = results[0]
    return [{"size_ratio": r.file_bytes / base.file_bytes,
             "p50_ratio": r.p50_ms / base.p50_ms if base.p50_ms > 0 else float("nan"),
             "speedup": base.p50_ms / r.p50_ms if r.p50_ms > 0 else float("nan")}
            for r in results]
