"""onnxq model zoo: real float models with calibration and evaluation data, built offline.

Each entry of ``ZOO`` turns a package that carries its own weights and data into a float ONNX
model, a folder of calibration feeds and a cached evaluation set (see ``common`` for the
layout). Calibration and evaluation data never overlap.

    from onnxq import zoo
    model = zoo.get("efficientnet_lite0")
    built = model.build(zoo.default_cache_dir())
    metrics = model.evaluate(quantized_onnx_path, built)   # {"top1_agreement": ..., ...}

Models: ``digits`` (smoke test; its float model and calibration stack are also committed in
``bundled/``), ``efficientnet_lite0``, ``minilm_l6`` and ``ppocr_rec``. Building needs the
``zoo`` extra (torch and the data packages); evaluating a built model needs only numpy,
scipy and onnxruntime. Heavy packages are imported inside functions, never here.

Command line: ``python -m onnxq.zoo.build [names...] [--cache DIR] [--eval]``.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import digits, efficientnet_lite0, minilm_l6, ppocr_rec
from .common import BuiltModel, ZooModel

__all__ = ["ZOO", "BuiltModel", "ZooModel", "default_cache_dir", "get"]

ZOO: dict[str, ZooModel] = {
    model.name: model
    for model in (digits.MODEL, efficientnet_lite0.MODEL, minilm_l6.MODEL, ppocr_rec.MODEL)
}


def get(name: str) -> ZooModel:
    """The registry entry ``name``; KeyError names the known models."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


def default_cache_dir() -> Path:
    """``$ONNXQ_ZOO_DIR`` if set, else ``<repo root>/.zoo`` (gitignored)."""
    env = os.environ.get("ONNXQ_ZOO_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / ".zoo"
