"""Reading models defensively and writing them atomically.

Reading turns every way a file can be wrong (missing, not ONNX, truncated, weights in a
missing external-data file) into one `ModelError` line; an op ONNX Runtime cannot run is
found when a session is opened (onnxq.scoring.sessions).
Writing never touches the input: the model goes to a temporary file beside the target and is
renamed over it only once complete; models past protobuf's 2 GB limit keep their weights in
an external-data file beside the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxq.errors import ModelError, OnnxqError

logger = logging.getLogger(__name__)

# ORT 1.31 reads IR versions up to this one.
MAX_IR_VERSION = 10
_PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_THRESHOLD = 1_800_000_000


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX model, external data included."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as error:
        raise ModelError(f"{path} is not a readable ONNX model ({error})") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise ModelError(f"{path} is not an ONNX model (no graph, or a graph with no nodes)")
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        raise ModelError(f"{path}: cannot read its external weight data ({error})") from None
    check_model(proto, str(path))
    return proto


def check_model(proto: onnx.ModelProto, label: str) -> None:
    """onnx.checker on a model in memory; a failure is a ModelError naming `label`."""
    try:
        if proto.ByteSize() < _PROTOBUF_LIMIT:
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "invalid"
        raise ModelError(f"{label} fails the ONNX checker: {first_line}") from None


def model_bytes(proto: onnx.ModelProto) -> bytes:
    return proto.SerializeToString()


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(proto)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    proto = ir.to_proto(model)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when two paths name the same file (existing or not)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output_path(input_path: str | Path | None, output_path: str | Path) -> Path:
    """Refuse an output path that is the input or a folder (missing folders are made later)."""
    output_path = Path(output_path)
    if input_path is not None and same_file(input_path, output_path):
        raise OnnxqError(f"output path {output_path} is the input model; choose another path")
    if output_path.is_dir():
        raise OnnxqError(f"output path {output_path} is a folder; give a file name")
    if output_path.parent.exists() and not output_path.parent.is_dir():
        raise OnnxqError(f"output folder {output_path.parent} is not a folder")
    return output_path


def save_model_atomic(proto: onnx.ModelProto, path: str | Path) -> Path:
    """Write a model to `path` through a temporary file and a rename.

    Models near protobuf's 2 GB limit are written with their tensors in `<name>.data` beside
    the model (also through a temporary name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = proto.ByteSize() > _EXTERNAL_THRESHOLD
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = f"{path.name}.data"
    tmp_data = path.parent / f".{data_name}.tmp"
    try:
        if external:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            # The model refers to its data file by name: point it at the final name.
            written = onnx.load(str(tmp), load_external_data=False)
            for tensor in onnx.external_data_helper._get_all_tensors(written):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            with open(tmp, "wb") as handle:
                handle.write(written.SerializeToString())
            os.replace(tmp_data, path.parent / data_name)
        else:
            with open(tmp, "wb") as handle:
                handle.write(proto.SerializeToString())
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp_data):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    logger.info("wrote %s", path)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp_name).unlink()
    return path
