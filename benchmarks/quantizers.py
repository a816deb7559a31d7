"""The quantizers the benchmark runs: onnxq and its peers, each `run(source, target, calib_dir,
model, **options)`.

Every quantizer reads the same calibration feeds (a folder of `.npz` files, one model run
each) and writes one ONNX file. Each runs in its own child process (see `run.py`); the modules
in `Quantizer.imports` are imported before the clock starts, so import time is not counted as
quantization time.

Peers get the pre-processing a careful user does before calling them (`prepared_for_peer`):
weights held in Constant nodes become initializers (ORT and NNCF only quantize initializers;
PP-OCR's weights are Constants) and the opset is raised to 13 (per-channel QDQ) or 21 (INT4
QDQ). Neither ORT nor NNCF does that by itself. onnxq does its own preparation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Feed = dict[str, Any]


@dataclass(frozen=True)
class Quantizer:
    run: Callable[..., None]  # (source, target, calib_dir, model, **options)
    imports: tuple[str, ...]  # imported before timing starts
    env: dict[str, str] = field(default_factory=dict)  # set before those imports


def load_feeds(calib_dir: Path) -> list[Feed]:
    import numpy as np

    return [dict(np.load(path)) for path in sorted(Path(calib_dir).glob("*.npz"))]


def padded(feeds: list[Feed]) -> list[Feed]:
    """Feeds zero-padded at the end of every axis to one common shape (what ORT's histogram
    calibrators need: they stack all feeds). Zero is the padding of the zoo's own
    pre-processing (normalized image width) and of a text model's ids and attention mask."""
    import numpy as np

    targets = {name: np.max([f[name].shape for f in feeds], axis=0) for name in feeds[0]}
    return [{name: np.pad(array, [(0, t - s) for s, t in zip(array.shape, targets[name], strict=True)])
             for name, array in feed.items()} for feed in feeds]


def prepared_for_peer(source: Path, opset: int = 13):
    """The float model with Constant weights lifted to initializers, Casts of initializers
    folded, IR version at most 10 (what ORT 1.31 reads) and the default-domain opset raised to
    at least `opset`."""
    import onnx
    import onnx.version_converter
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

    model = ir.from_proto(onnx.load(str(source)))
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    _fold_initializer_casts(model)
    RemoveUnusedNodesPass()(model)
    proto = ir.to_proto(model)
    proto.ir_version = min(proto.ir_version, 10)
    current = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if current < opset:
        proto = onnx.version_converter.convert_version(proto, opset)
        proto.ir_version = min(proto.ir_version, 10)
    return proto


def _fold_initializer_casts(model) -> None:
    """Cast(initializer) -> a cast initializer. Lifting PP-OCR's Constants leaves Casts of
    initializers, on which NNCF 3.4's `eliminate_nop_cast` fails (it reads `.type` of a
    TensorProto); constant folding (onnxsim, ORT's pre-processing) removes them too."""
    import onnx_ir as ir

    graph = model.graph
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        source, output = node.inputs[0], node.outputs[0]
        if source is None or not source.is_initializer() or source.const_value is None \
                or output.is_graph_output():
            continue
        dtype = ir.DataType(node.attributes["to"].as_int())
        folded = ir.Value(name=f"{output.name}_folded",
                          const_value=ir.tensor(source.const_value.numpy().astype(dtype.numpy())))
        graph.register_initializer(folded)
        output.replace_all_uses_with(folded)
        graph.remove(node, safe=True)


def _save_prepared(source: Path, target: Path, opset: int) -> Path:
    import onnx

    path = target.with_suffix(".prepared.onnx")
    onnx.save(prepared_for_peer(source, opset), str(path))
    return path


# --- onnxq -----------------------------------------------------------------------------------


def onnxq_quantize(source: Path, target: Path, calib_dir: Path, model: str, **options: Any) -> None:
    """`onnxq.quantize` with the default config changed by `options` (QuantConfig fields by
    their TOML names and values)."""
    import onnxq
    from onnxq.config import config_from_dict, config_to_dict

    config = config_from_dict({**config_to_dict(onnxq.QuantConfig()), **options})
    onnxq.quantize(source, calib_dir, config).save(target)


def onnxq_no_data(source: Path, target: Path, calib_dir: Path, model: str, **options: Any) -> None:
    """`onnxq.quantize` without calibration data (`activations = "dynamic"`, what runs without
    it): the calibration feeds are not read, as ORT's `quantize_dynamic` reads none."""
    import onnxq
    from onnxq.config import config_from_dict, config_to_dict

    config = config_from_dict({**config_to_dict(onnxq.QuantConfig()), "activations": "dynamic", **options})
    onnxq.quantize(source, None, config).save(target)


# --- ONNX Runtime ----------------------------------------------------------------------------


def ort_static(source: Path, target: Path, calib_dir: Path, model: str, *, method: str,
               pad: bool = False, stride: int | None = None, weight_type: str = "QInt8",
               opset: int = 13) -> None:
    """`quantize_static`: QDQ, per-channel weights of `weight_type`, uint8 activations.

    `pad`: feeds zero-padded to one shape. `stride`: ORT's `CalibStridedMinMax` option (any
    calibrator, despite its name): statistics are collected `stride` feeds at a time and merged
    (histograms grow as data comes), so feeds of different shapes are never stacked and memory
    stays bounded."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    feeds = load_feeds(calib_dir)
    feeds = padded(feeds) if pad else feeds

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, len(feeds))

        def __len__(self) -> int:
            return len(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.feeds = iter(feeds[start_index:end_index])

        def get_next(self):
            return next(self.feeds, None)

    prepared = _save_prepared(source, target, opset)
    quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=getattr(QuantType, weight_type),
                    calibrate_method=getattr(CalibrationMethod, method),
                    extra_options={"CalibStridedMinMax": stride} if stride else None)


def ort_dynamic(source: Path, target: Path, calib_dir: Path, model: str) -> None:
    """`quantize_dynamic` with its defaults (int8 weights, activations quantized at run time);
    it takes no calibration data."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared = _save_prepared(source, target, 13)
    quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)


def ort_nbits(source: Path, target: Path, calib_dir: Path, model: str, *, bits: int, block_size: int,
              is_symmetric: bool, accuracy_level: int) -> None:
    """`MatMulNBitsQuantizer` (RTN weight-only, blocked): MatMul weights to com.microsoft
    MatMulNBits; `accuracy_level` 4 lets ORT quantize activations to int8 inside the kernel."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(prepared_for_peer(source, 13), bits=bits, block_size=block_size,
                                     is_symmetric=is_symmetric, accuracy_level=accuracy_level)
    quantizer.process()
    onnx.save(quantizer.model.model, str(target))


# --- NNCF ------------------------------------------------------------------------------------


def nncf_quantize(source: Path, target: Path, calib_dir: Path, model: str) -> None:
    """`nncf.quantize` on the ONNX backend with its defaults, on all calibration feeds
    (`subset_size`), `ModelType.TRANSFORMER` for the transformer."""
    import nncf
    import onnx
    from rowspecs import TRANSFORMERS

    feeds = load_feeds(calib_dir)
    kwargs: dict[str, Any] = {"subset_size": len(feeds)}
    if model in TRANSFORMERS:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    quantized = nncf.quantize(prepared_for_peer(source, 13), nncf.Dataset(feeds), **kwargs)
    onnx.save(quantized, str(target))


_PEER_IMPORTS = ("numpy", "onnx", "onnx.version_converter", "onnx_ir", "onnx_ir.passes.common")

QUANTIZERS: dict[str, Quantizer] = {
    "onnxq": Quantizer(onnxq_quantize, ("onnxq", "onnxq.config")),
    "onnxq_no_data": Quantizer(onnxq_no_data, ("onnxq", "onnxq.config")),
    "ort_static": Quantizer(ort_static, (*_PEER_IMPORTS, "onnxruntime.quantization")),
    "ort_dynamic": Quantizer(ort_dynamic, (*_PEER_IMPORTS, "onnxruntime.quantization")),
    "ort_nbits": Quantizer(ort_nbits, (*_PEER_IMPORTS,
                                       "onnxruntime.quantization.matmul_nbits_quantizer")),
    # NNCF_CI: no telemetry (NNCF sends usage events to Google Analytics unless told not to).
    "nncf": Quantizer(nncf_quantize, (*_PEER_IMPORTS, "nncf"), {"NNCF_CI": "1"}),
}


def prepare_child(quantizer: Quantizer) -> None:
    """Environment and imports of a quantizer, done in the child before its clock starts."""
    import importlib

    os.environ.update(quantizer.env)
    for module in quantizer.imports:
        importlib.import_module(module)
