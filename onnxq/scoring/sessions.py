"""Every ONNX Runtime (ORT) session of onnxq is opened here, and run errors become one line.

    open_session(model, label, settings)   model: onnx.ModelProto | bytes | path | onnx_ir.Model
    run(session, names, feed, label)       session.run, an ORT failure as a one-line ModelError

One place means one set of options (`SessionSettings`: threads, provider, optimization level,
session config entries), one wording of load and run failures, and one answer to protobuf's
2 GB limit: a model whose serialized size would pass `EXTERNAL_DATA_THRESHOLD` is written to a
temporary folder with its tensors in an external-data file and opened by path (an in-memory
model that large cannot be serialized: 'EncodeError: Failed to serialize proto'). It is written
tensor by tensor without copying the model (`model_io.save_with_external_data`), and its size is
estimated without `ByteSize` (which serializes the whole message, then fails at 2 GB). An onnx_ir
model whose tensors are mapped from files (read lazily from the float model's folder, or
spilled) goes the same way, any size: its mapped tensors are copied file to file, never read
into this process. The folder lives as long as the session: ORT maps the data file (its offsets
aligned) rather than copying it.

Providers are named "cpu" and "cuda"; one that this onnxruntime build lacks is a `ConfigError`
when the settings are made, and a session in which ORT fell back to another provider (CUDA
failing to start) is an error rather than a silently slower run.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from onnxq import model_io
from onnxq.errors import ConfigError, ModelError, OnnxqError

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Past this serialized size a model goes to ORT through a file with external data (protobuf
# refuses to serialize a message of 2 GB or more; the margin covers the estimate's error).
EXTERNAL_DATA_THRESHOLD = model_io.EXTERNAL_DATA_THRESHOLD
_EXTERNAL_DATA_NAME = "model.onnx.data"
_ORT_RUN_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.RuntimeException,
                   ort_state.NotImplemented, ort_state.EPFail)
_ORT_SOURCE_LOCATION = re.compile(r"/onnxruntime_src/\S+:\d+ (\S+\([^)]*\) )?")

Model = onnx.ModelProto | bytes | str | Path | ir.Model
Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class SessionSettings:
    """How ORT sessions are made.

    threads: intra-op threads (0: ORT's choice, one per core); inter_op_threads likewise
    (execution is sequential, so inter-op threads matter only to ORT's own parallel sections).
    provider: "cpu" (CPUExecutionProvider) or "cuda" (CUDAExecutionProvider).
    config_entries: (key, value) pairs for `SessionOptions.add_session_config_entry`.
    log_severity: ORT's log level (3: errors only; 4: fatal only); failures come back as
    exceptions either way.
    profile_prefix: when set, ORT profiles every run into a JSON file named from this prefix
    (`session.end_profiling()` returns its path).
    """

    threads: int = 0
    provider: str = "cpu"
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    config_entries: tuple[tuple[str, str], ...] = ()
    inter_op_threads: int = 0
    log_severity: int = 3
    profile_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ConfigError(f"threads must be 0 (ORT's choice) or more, got {self.threads}")
        if self.inter_op_threads < 0:
            raise ConfigError(f"inter-op threads must be 0 (ORT's choice) or more, "
                              f"got {self.inter_op_threads}")
        if self.provider not in PROVIDERS:
            raise ConfigError(f"unknown provider {self.provider!r}; choose one of "
                              f"{', '.join(PROVIDERS)}")
        name = PROVIDERS[self.provider]
        available = ort.get_available_providers()
        if name not in available:
            raise ConfigError(f"provider {self.provider} ({name}) is not available in this "
                              f"onnxruntime build (available: {', '.join(available)}); install "
                              f"onnxruntime-gpu for cuda")
        if isinstance(self.config_entries, Mapping):
            object.__setattr__(self, "config_entries", tuple(self.config_entries.items()))
        for entry in self.config_entries:
            if len(entry) != 2 or not all(isinstance(part, str) for part in entry):
                raise ConfigError(f"session config entries are (key, value) strings, got {entry!r}")

    @property
    def provider_name(self) -> str:
        return PROVIDERS[self.provider]

    def options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = self.optimization
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        if self.inter_op_threads:
            options.inter_op_num_threads = self.inter_op_threads
        options.log_severity_level = self.log_severity
        for key, value in self.config_entries:
            options.add_session_config_entry(key, value)
        if self.profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = self.profile_prefix
        return options


def one_line(error: Exception) -> str:
    """ORT's message on one line, at most 300 characters."""
    return " ".join(str(error).split())[:300]


def tidy_line(error: Exception) -> str:
    """ORT's message on one line without the C++ source location and signature it may carry;
    at most 300 characters, '...' marking a cut."""
    text = _ORT_SOURCE_LOCATION.sub("", " ".join(str(error).split()))
    return text if len(text) <= 300 else text[:297] + "..."


def estimated_bytes(model: Model) -> int:
    """The model's serialized size: exact for bytes and protos up to the limit, the inline
    tensors' bytes for a proto past it (`model_io.serialized_size`), the initializers' bytes (all
    graphs) for an onnx_ir model; 0 for a path (opened as it is)."""
    if isinstance(model, bytes):
        return len(model)
    if isinstance(model, onnx.ModelProto):
        return model_io.serialized_size(model)
    if isinstance(model, ir.Model):
        return sum(value.const_value.nbytes for graph in model.graphs()
                   for value in graph.initializers.values() if value.const_value is not None)
    return 0


def needs_external_data(model: Model) -> bool:
    """True when the model goes to ORT through a file with external data: past the threshold,
    or an onnx_ir model whose tensors are read from files (of its own folder, or spilled)."""
    if isinstance(model, ir.Model) and model_io.has_external_tensors(model):
        return True
    return isinstance(model, (onnx.ModelProto, ir.Model)) and \
        estimated_bytes(model) > EXTERNAL_DATA_THRESHOLD


def open_session(model: Model, label: str, settings: SessionSettings | None = None, *,
                 optimized_model_path: str | Path | None = None,
                 describe: Callable[[Exception], str] = one_line) -> ort.InferenceSession:
    """An ORT session on the model; one ORT cannot load (e.g. an unsupported op) is a
    ModelError naming `label`. `optimized_model_path`: where ORT writes the graph it runs
    (after its optimizations). `describe` words ORT's error (default `one_line`)."""
    settings = settings or SessionSettings()
    options = settings.options()
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    folder = None
    if isinstance(model, (str, Path)):
        source: str | bytes = str(model)
    elif isinstance(model, bytes):
        source = model
    elif needs_external_data(model):
        folder = tempfile.TemporaryDirectory(prefix="onnxq-session-", ignore_cleanup_errors=True)
        source = str(_write_external(model, Path(folder.name)))
    elif isinstance(model, ir.Model):
        source = model_io.to_proto(model).SerializeToString()
    elif isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    else:
        raise TypeError(f"a model is an onnx.ModelProto, bytes, a path or an onnx_ir.Model, "
                        f"not {type(model).__name__}")
    provider = settings.provider_name
    try:
        session = ort.InferenceSession(source, options, providers=[provider])
    except Exception as error:  # ORT raises its own exception types per failure kind
        if folder is not None:
            folder.cleanup()
        raise ModelError(f"ONNX Runtime cannot load {label}: {describe(error)}") from None
    if folder is not None:
        session.onnxq_external_data = folder  # kept as long as the session
    if session.get_providers()[0] != provider:  # ORT falls back to the CPU when CUDA fails to start
        raise OnnxqError(f"{provider} did not start for {label} (ONNX Runtime fell back to "
                         f"{session.get_providers()[0]}); check the CUDA and cuDNN libraries")
    return session


def _write_external(model: onnx.ModelProto | ir.Model, folder: Path) -> Path:
    """The model as `folder`/model.onnx with its tensors in `folder`/model.onnx.data."""
    logger.info("model of about %d bytes: opened through external data in %s",
                estimated_bytes(model), folder)
    return model_io.save_with_external_data(model, folder / "model.onnx", _EXTERNAL_DATA_NAME)


def run(session: ort.InferenceSession, names: Sequence[str] | None, feed: Feed,
        label: str) -> list[np.ndarray]:
    """`session.run(names, feed)`; an ORT failure (e.g. a feed the model rejects) is a one-line
    ModelError naming `label`."""
    try:
        return session.run(names, feed)
    except _ORT_RUN_ERRORS as error:
        raise ModelError(f"ONNX Runtime cannot run {label} on the feeds: {one_line(error)}") from None
