"""Reading models defensively and writing them atomically, past protobuf's 2 GB limit too.

Reading turns every way a file can be wrong (missing, not ONNX, truncated, weights in a
missing external-data file) into one `ModelError` line; an op ONNX Runtime cannot run is
found when a session is opened (onnxq.scoring.sessions). A model read from a file is checked
by path, the way onnx.checker handles external data; a model in memory past the limit is
checked through a temporary copy with external data (protobuf cannot serialize it, nor
`ByteSize` count it: `serialized_size` estimates it from the tensors instead).

Writing never touches the input and never leaves a half-written output:

    one file        .<name>.<random>.tmp                 write, fsync -> rename to <name>
    external data   .<name>.<random>.tmp/<name>          (one temporary folder, both files)
                    .<name>.<random>.tmp/<name>.data     write, fsync -> rename the data file,
                                                         then the model, out of it
    then the folder itself is fsynced (where the OS allows it)

Temporary names are unique (mkstemp, mkdtemp), so runs writing into one folder at once never
collide; a run killed while writing leaves the earlier output as it was and at most one
temporary entry, named `.<name>.<random>.tmp`. Between the two renames of an external-data
model (microseconds, after every byte is on disk) a kill would leave the new data file beside
an earlier model file; two files cannot be swapped in one atomic step. A model goes to
external data when asked, or when its size passes `EXTERNAL_DATA_THRESHOLD`; the tensors go
to `<name>.data` (the `location` the model records) and the model keeps the rest.

A write that fails for a reason of the file system (full disk, read-only folder, no
permission) is an `OnnxqError` naming the path and the reason, and removes its temporary
files. Written files get the usual permissions (0666 less the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx.external_data_helper import _get_all_tensors

from onnxq.errors import ModelError, OnnxqError

logger = logging.getLogger(__name__)

# ORT 1.31 reads IR versions up to this one.
MAX_IR_VERSION = 10
PROTOBUF_LIMIT = 2**31 - 1
# Past this many bytes a model is written (and opened in ORT) with its tensors in an external
# data file; the margin below protobuf's limit covers what `serialized_size` leaves out.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors smaller than this stay inside the model file when the rest goes to external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024
# Offsets of external tensors are multiples of this, so ONNX Runtime can map them from the file
# (and Windows' allocation granularity is met too).
EXTERNAL_DATA_ALIGNMENT = 65536
TEMP_SUFFIX = ".tmp"
_EXTERNAL = onnx.TensorProto.EXTERNAL


def load_model(path: str | Path, external_data: bool = True) -> onnx.ModelProto:
    """Load and check an ONNX model, external data included unless `external_data` is False:
    then its external tensors stay references to the file (`to_ir` with the model's folder
    maps them lazily), and a 2 GB model costs nothing to hold."""
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
        if external_data:
            onnx.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        raise ModelError(f"{path}: cannot read its external weight data ({error})") from None
    _checked(lambda: onnx.checker.check_model(str(path)), str(path))
    return proto


def check_model(proto: onnx.ModelProto, label: str) -> None:
    """onnx.checker on a model in memory; a failure is a ModelError naming `label`. A model past
    protobuf's limit is checked by path, through a temporary copy with external data."""
    if serialized_size(proto) <= EXTERNAL_DATA_THRESHOLD:
        _checked(lambda: onnx.checker.check_model(proto), label)
        return
    with tempfile.TemporaryDirectory(prefix="onnxq-check-") as folder:
        path = save_with_external_data(proto, Path(folder) / "model.onnx")
        _checked(lambda: onnx.checker.check_model(str(path)), label)


def _checked(check, label: str) -> None:
    try:
        check()
    except onnx.checker.ValidationError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "invalid"
        raise ModelError(f"{label} fails the ONNX checker: {first_line}") from None


def serialized_size(proto: onnx.ModelProto) -> int:
    """The model's size serialized: protobuf's exact count up to `EXTERNAL_DATA_THRESHOLD`;
    past it (where `ByteSize` serializes the whole message, then fails at 2 GB) the bytes of its
    tensors held inside the model, from their shapes and element types."""
    inline = inline_tensor_bytes(proto)
    return inline if inline > EXTERNAL_DATA_THRESHOLD else proto.ByteSize()


def inline_tensor_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the tensors (initializers, attributes, subgraphs) stored inside the model."""
    return sum(_tensor_bytes(t) for t in _get_all_tensors(proto) if t.data_location != _EXTERNAL)


def external_tensor_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the tensors the model keeps in external data (0 when it keeps none)."""
    return sum(_tensor_bytes(t) for t in _get_all_tensors(proto) if t.data_location == _EXTERNAL)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """A tensor's bytes from its shape and element type (0 for strings: no fixed width, never the
    big part of a model)."""
    try:
        itemsize = ir.DataType(tensor.data_type).itemsize
    except (TypeError, ValueError):
        return 0
    return math.ceil(math.prod(tensor.dims) * itemsize)


def in_memory_bytes(model: ir.Model) -> int:
    """Bytes of the initializers (all graphs) held in memory, not mapped from a file."""
    return sum(value.const_value.nbytes for graph in model.graphs() for value in graph.initializers.values()
               if value.const_value is not None and not isinstance(value.const_value, ir.ExternalTensor))


def has_external_tensors(model: ir.Model) -> bool:
    """True when an initializer (any graph) is read from a file rather than held in memory."""
    return any(isinstance(value.const_value, ir.ExternalTensor)
               for graph in model.graphs() for value in graph.initializers.values())


def spill(model: ir.Model, folder: str | Path) -> None:
    """Move the model's initializers of `EXTERNAL_TENSOR_MIN_BYTES` or more, in place, into
    `folder`/model.onnx.data: they become external tensors mapped from that file when read,
    and the arrays they were are freed. `folder` must outlive the model."""
    ir.external_data.unload_from_model(model, str(folder), "model.onnx.data",
                                       size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
                                       alignment=EXTERNAL_DATA_ALIGNMENT)


def unmap(model: ir.Model) -> None:
    """Close the file mappings of the model's external tensors: the pages read from them leave
    this process's memory, and a tensor read again is mapped again. A tensor whose array is
    still held elsewhere stays mapped."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                with contextlib.suppress(BufferError):
                    value.const_value.release()


def in_memory(model: ir.Model) -> ir.Model:
    """The model with every external tensor read into memory, in place (before `to_proto`,
    whose external references would point nowhere)."""
    return ir.external_data.load_to_model(model)


def external_data_files(path: str | Path) -> list[str]:
    """Names (sorted, each once) of the external-data files the model file at `path` refers to."""
    proto = onnx.load(str(path), load_external_data=False)
    return sorted({entry.value for tensor in _get_all_tensors(proto) for entry in tensor.external_data
                   if entry.key == "location"})


def has_external_data(path: str | Path | None) -> bool:
    """True when the model file at `path` keeps tensors in external data (False for None)."""
    return path is not None and Path(path).is_file() and bool(external_data_files(path))


def model_bytes(proto: onnx.ModelProto) -> bytes:
    return proto.SerializeToString()


def to_ir(proto: onnx.ModelProto, base_dir: str | Path | None = None) -> ir.Model:
    """The proto as onnx-ir; its external tensors (if any) are read from `base_dir`, lazily."""
    model = ir.from_proto(proto)
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
    return model


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


def external_data_name(path: str | Path) -> str:
    """The name of the external-data file written beside the model at `path`."""
    return f"{Path(path).name}.data"


def save_with_external_data(model: onnx.ModelProto | ir.Model, path: Path,
                            data_name: str | None = None) -> Path:
    """Write `model` to `path` with its tensors in `path`'s folder / `data_name` (default
    `<name>.data`), leaving `model` unchanged and without copying it: a proto is wrapped by
    onnx-ir, which streams one tensor at a time into the data file. No atomicity here."""
    model = ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model
    ir_version = model.ir_version
    model.ir_version = min(ir_version, MAX_IR_VERSION)
    try:
        ir.save(model, path, external_data=data_name or external_data_name(path),
                size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES, alignment=EXTERNAL_DATA_ALIGNMENT)
    finally:
        model.ir_version = ir_version
    return path


def save_model_atomic(proto: onnx.ModelProto, path: str | Path, *, external_data: bool = False) -> Path:
    """Write a model to `path` through temporary files and renames (see the module docstring).

    `external_data`: put the tensors in `<name>.data` beside the model even when it would fit in
    one file; models past `EXTERNAL_DATA_THRESHOLD` are written that way in any case.
    """
    path = Path(path)
    external = external_data or serialized_size(proto) > EXTERNAL_DATA_THRESHOLD
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if external:
            _replace_with_external_data(proto, path)
        else:
            _replace_with_bytes(path, proto.SerializeToString())
    logger.info("wrote %s%s", path, f" and {external_data_name(path)}" if external else "")
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file (UTF-8) through a temporary file and a rename."""
    path = Path(path)
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace_with_bytes(path, text.encode("utf-8"))
    return path


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _replace_with_bytes(path: Path, data: bytes) -> None:
    """`data` into a unique temporary file beside `path`, fsynced, then renamed over `path`."""
    fd, temp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            _finish(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        _remove(Path(temp_name))
        raise
    _sync_folder(path.parent)


def _replace_with_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Model and data into a unique temporary folder beside `path`, fsynced, then renamed out
    of it: the data file first, the model last."""
    folder = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent))
    try:
        data_name = external_data_name(path)
        staged_model, staged_data = folder / path.name, folder / data_name
        save_with_external_data(proto, staged_model, data_name)
        staged = [staged_data, staged_model] if staged_data.exists() else [staged_model]
        for staged_file in staged:
            with open(staged_file, "rb") as handle:
                _finish(handle.fileno())
        for staged_file in staged:
            os.replace(staged_file, path.parent / staged_file.name)
    finally:
        _remove(folder)
    _sync_folder(path.parent)


def _finish(fd: int) -> None:
    """Usual permissions, and the file's bytes on disk before it is renamed into place."""
    os.fchmod(fd, 0o666 & ~_umask())
    os.fsync(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sync_folder(folder: Path) -> None:
    """fsync a folder so a rename in it survives a crash; some systems refuse (then skip)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(temp: Path) -> None:
    if temp.is_dir():
        shutil.rmtree(temp, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """An OSError while writing `path` (full disk, read-only folder, no permission) becomes one
    OnnxqError line naming the path and the reason."""
    try:
        yield
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise OnnxqError(f"cannot write {path}: {reason}") from None
