"""Provenance: digests that tie a quantized model to the float model, data and software that
made it.

A card records the sha256 of the float model and of the written model (each `.onnx` file and
every external-data file it references), a digest of the calibration data's contents, and the
versions of onnxq and the libraries whose behaviour decides the bytes written. `onnxq check
--card` recomputes them: a model file that is not the one its card describes fails the gate.

The calibration digest hashes what the feeds hold (input names, dtypes, shapes and values, feed
by feed in order), not the files: the same arrays give the same digest whether they come from
one `.npz`, a folder of them or Python dicts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

from onnxq.model_io import external_data_files

CHUNK = 1 << 20
# Distributions whose versions decide the bytes onnxq writes.
VERSIONED = ("onnxq", "onnx", "onnx-ir", "onnxruntime", "numpy")


@dataclass(frozen=True)
class ModelDigest:
    """sha256 of a model file and of each external-data file it references (by file name)."""

    sha256: str
    external_data: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"sha256": self.sha256, "external_data": dict(self.external_data)}

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> ModelDigest:
        return cls(str(values["sha256"]), tuple(sorted(dict(values.get("external_data") or {}).items())))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_digest(path: str | Path) -> ModelDigest:
    """The digest of a model file as written (external data included, read by name)."""
    path = Path(path)
    return ModelDigest(file_sha256(path),
                       tuple((name, file_sha256(path.parent / name)) for name in external_data_files(path)))


def proto_sha256(proto: onnx.ModelProto) -> str:
    """sha256 of a model given in memory (its serialized bytes)."""
    return hashlib.sha256(proto.SerializeToString()).hexdigest()


def feeds_sha256(feeds: Iterable[Mapping[str, np.ndarray]]) -> str:
    """A digest of feeds' contents: per feed, per input name (sorted), dtype, shape and bytes."""
    digest = hashlib.sha256()
    for feed in feeds:
        digest.update(b"feed")
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Installed versions of the distributions that decide the written bytes."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


@dataclass(frozen=True)
class Provenance:
    """Where a quantized model came from: the float model, the calibration data (its digest
    and where it was read from) and the library versions."""

    float_model: ModelDigest
    calibration_sha256: str
    calibration_origin: str
    versions: tuple[tuple[str, str], ...]

    def to_dict(self) -> dict[str, object]:
        return {"float_model": self.float_model.to_dict(),
                "calibration": {"sha256": self.calibration_sha256, "origin": self.calibration_origin},
                "versions": dict(self.versions)}


def source_provenance(model_path: str | Path | None, proto: onnx.ModelProto,
                      feeds: Iterable[Mapping[str, np.ndarray]], origin: str) -> Provenance:
    """Provenance of a run reading `proto` (from `model_path` when it came from a file) and `feeds`."""
    float_model = model_digest(model_path) if model_path is not None else ModelDigest(proto_sha256(proto))
    return Provenance(float_model, feeds_sha256(feeds), origin, tuple(versions().items()))
