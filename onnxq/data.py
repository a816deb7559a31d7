"""Calibration feeds: reading, checking against the model, and splitting off held-out feeds.

Three forms are accepted:

- a `.npz` file, one array per model input, samples stacked on axis 0: sample i is the feed
  `{name: array[i:i+1]}` (the model's batch axis keeps size 1);
- a folder of `.npz` files, one whole feed each (so sequence lengths may differ);
- from Python, any iterable of feed dicts `{input name: array}`.

Feeds are read lazily, one at a time, so a thousand feeds cost the memory of one. Every feed
is checked against the model's inputs on the way: missing or unknown names, wrong rank, a fixed
dimension that differs, a dtype that differs, NaN or infinity; a bad feed is a
`CalibrationDataError` that names the feed and the input.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxq.errors import CalibrationDataError

Feed = dict[str, np.ndarray]

HOW_TO_MAKE_DATA = (
    "give --calib a .npz with one array per model input (samples on axis 0) or a folder of "
    ".npz feeds, e.g. np.savez('calib.npz', input=x)"
)


@dataclass(frozen=True)
class InputSpec:
    """A graph input as calibration data must match it: dtype and shape (None: any size)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None


def model_input_specs(proto: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs a feed must provide (initializers listed as inputs excluded)."""
    initializer_names = {t.name for t in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializer_names:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None
                          for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def check_feed(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec], label: str) -> Feed:
    """Check one feed against the model inputs; return it as a dict of arrays."""
    expected = {s.name for s in specs}
    missing = sorted(expected - set(feed))
    unknown = sorted(set(feed) - expected)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown name(s) {', '.join(unknown)}")
        raise CalibrationDataError(f"calibration {label}: {'; '.join(parts)} "
                                   f"(the model's inputs are {', '.join(sorted(expected))})")
    checked: Feed = {}
    for spec in specs:
        array = np.asarray(feed[spec.name])
        if array.dtype != spec.dtype:
            raise CalibrationDataError(f"calibration {label}: input {spec.name} has dtype {array.dtype}, "
                                       f"the model takes {spec.dtype}")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise CalibrationDataError(
                    f"calibration {label}: input {spec.name} has shape {list(array.shape)}, "
                    f"the model takes rank {len(spec.shape)} ({_shape_text(spec.shape)})")
            for got, want in zip(array.shape, spec.shape, strict=True):
                if want is not None and want > 0 and got != want:
                    raise CalibrationDataError(
                        f"calibration {label}: input {spec.name} has shape {list(array.shape)}, "
                        f"the model takes {_shape_text(spec.shape)}")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise CalibrationDataError(f"calibration {label}: input {spec.name} contains NaN or "
                                       f"infinite values")
        checked[spec.name] = array
    return checked


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None or d <= 0 else str(d) for d in shape) + "]"


class CalibrationSet:
    """An ordered, re-iterable collection of checked feeds, read lazily.

    Indexable by position so that held-out feeds can be picked without reading the others.
    """

    def __init__(self, sources: Sequence[object], reader, specs: Sequence[InputSpec], origin: str):
        self._sources = list(sources)
        self._reader = reader
        self._specs = list(specs)
        self.origin = origin

    def __len__(self) -> int:
        return len(self._sources)

    def feed(self, index: int) -> Feed:
        label, raw = self._reader(self._sources[index])
        return check_feed(raw, self._specs, label)

    def __iter__(self) -> Iterator[Feed]:
        for index in range(len(self)):
            yield self.feed(index)

    def subset(self, indices: Sequence[int]) -> CalibrationSet:
        return CalibrationSet([self._sources[i] for i in indices], self._reader, self._specs,
                              self.origin)

    def split(self, holdout: int, rng: np.random.Generator) -> tuple[CalibrationSet, CalibrationSet]:
        """(calibration, held out): `holdout` feeds drawn at random, never both; at least one
        feed always stays for calibration."""
        holdout = min(holdout, len(self) - 1)
        held = set(rng.choice(len(self), size=holdout, replace=False).tolist()) if holdout > 0 else set()
        keep = [i for i in range(len(self)) if i not in held]
        return self.subset(keep), self.subset(sorted(held))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CalibrationDataError(f"cannot read calibration file {path}: {error}") from None


def open_calibration(source: object, proto: onnx.ModelProto) -> CalibrationSet:
    """Open calibration data given as a path (.npz file or folder of .npz) or an iterable of
    feed dicts."""
    specs = model_input_specs(proto)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise CalibrationDataError(f"calibration folder {path} has no .npz files; "
                                           f"{HOW_TO_MAKE_DATA}")
            calibration = CalibrationSet(files, lambda f: (f"feed {f.name}", _read_npz(f)), specs,
                                         str(path))
        elif path.is_file():
            calibration = _stacked_samples(_read_npz(path), specs, str(path))
        else:
            raise CalibrationDataError(f"calibration data not found: {path}; {HOW_TO_MAKE_DATA}")
    elif isinstance(source, Mapping):
        calibration = _stacked_samples(dict(source), specs, "arrays")
    elif isinstance(source, Iterable):
        feeds = list(source)
        if not all(isinstance(f, Mapping) for f in feeds):
            raise CalibrationDataError("calibration iterable must yield dicts {input name: array}")
        calibration = CalibrationSet(list(enumerate(feeds)), lambda item: (f"feed {item[0]}", item[1]),
                                     specs, "iterable")
    else:
        raise CalibrationDataError(f"unsupported calibration data {type(source).__name__}; "
                                   f"{HOW_TO_MAKE_DATA}")
    if len(calibration) == 0:
        raise CalibrationDataError(f"calibration data {calibration.origin} holds no feeds; "
                                   f"{HOW_TO_MAKE_DATA}")
    return calibration


def no_feeds(proto: onnx.ModelProto) -> CalibrationSet:
    """The empty set of a run without calibration data (dynamic activations only)."""
    return CalibrationSet([], None, model_input_specs(proto), "none")


def _stacked_samples(arrays: dict[str, np.ndarray], specs: Sequence[InputSpec],
                     origin: str) -> CalibrationSet:
    """Samples stacked on axis 0 of each array, one feed per sample."""
    if not arrays:
        raise CalibrationDataError(f"calibration data {origin} holds no arrays; {HOW_TO_MAKE_DATA}")
    check_feed({k: v[:1] if np.ndim(v) else v for k, v in arrays.items()}, specs, f"in {origin}")
    counts = {name: len(array) for name, array in arrays.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationDataError(f"calibration data {origin}: arrays hold different numbers of "
                                   f"samples on axis 0: {counts}")
    count = next(iter(counts.values()))
    return CalibrationSet(list(range(count)),
                          lambda i: (f"sample {i} of {origin}",
                                     {k: v[i:i + 1] for k, v in arrays.items()}),
                          specs, origin)
