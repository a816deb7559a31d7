"""PP-OCRv4 text-line recognizer (rapidocr-onnxruntime's ``ch_PP-OCRv4_rec_infer.onnx``) on
text lines rendered with matplotlib's DejaVu fonts.

The model is already ONNX (paddle2onnx, opset 12, weights as Constant nodes) and is copied into
the cache untouched: turning Constants into initializers and upgrading the opset is the
quantizer's job. It is very sensitive to quantization: a plain int8 run loses a lot on the
hard set.

Pre/post-processing follows rapidocr's ``TextRecognizer`` for one line: resize to height 48
keeping the aspect ratio, scale to [-1, 1], pad on the right to at least 320 pixels (padding
is 0 after scaling), then CTC greedy decoding with the dictionary from the model's metadata
(index 0 is the CTC blank, the last class a space). Input: ``x`` float32 [1, 3, 48, W].

Data: lines of English words (from gensim's ``lee_background.cor``; the vocabulary is split
between calibration and evaluation), numbers, prices, dates and word + number, rendered in 6
DejaVu faces. ``clean`` lines are black on white; ``hard`` lines add a gray background, lower
contrast, blur and pixel noise. Metrics: exact match (after collapsing whitespace) and
character error rate (edit distance / reference length, summed over the set). The resized
lines are cached, so evaluation needs only numpy and onnxruntime.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .common import (
    BuiltModel,
    ZooModel,
    build_once,
    check_onnx,
    gensim_data_dir,
    layout,
    ort_session,
    package_dir,
    write_feeds,
)

logger = logging.getLogger(__name__)

NAME = "ppocr_rec"
INPUT_NAME = "x"
HEIGHT = 48
MIN_WIDTH = 320
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
)
SETS = ("clean", "hard")
N_EVAL = 200  # lines per evaluation set
EVAL_SEEDS = {"clean": 10, "hard": 11}
CALIB_SEED = 12
RECIPE = {"version": 2, "n_eval": N_EVAL, "eval_seeds": EVAL_SEEDS, "calib_seed": CALIB_SEED}


def source_model_path() -> Path:
    return package_dir("rapidocr_onnxruntime") / "models" / "ch_PP-OCRv4_rec_infer.onnx"


# --- text --------------------------------------------------------------------------------


def vocabularies() -> tuple[list[str], list[str]]:
    """(calibration words, evaluation words): lee_background's words, split in two halves."""
    text = (gensim_data_dir() / "lee_background.cor").read_text(encoding="latin-1")
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]+", text) if 3 <= len(w) <= 12})
    order = np.random.default_rng(0).permutation(len(words))
    return [words[i] for i in order[0::2]], [words[i] for i in order[1::2]]


def _word(rng: np.random.Generator, vocabulary: Sequence[str]) -> str:
    word = vocabulary[int(rng.integers(len(vocabulary)))]
    style = rng.random()
    return word if style < 0.5 else word.title() if style < 0.85 else word.upper()


def _number(rng: np.random.Generator) -> str:
    kind = rng.integers(3)
    if kind == 0:
        return str(int(rng.integers(10, 10**7)))
    if kind == 1:
        return f"${int(rng.integers(1, 1000))}.{int(rng.integers(100)):02d}"
    year, month, day = rng.integers(1990, 2030), rng.integers(1, 13), rng.integers(1, 29)
    return f"{year}-{month:02d}-{day:02d}"


def make_text(rng: np.random.Generator, vocabulary: Sequence[str]) -> str:
    """One line: a word, 2-3 words, a number/price/date, or a word and a number."""
    kind = rng.integers(4)
    if kind == 0:
        return _word(rng, vocabulary)
    if kind == 1:
        return " ".join(_word(rng, vocabulary) for _ in range(int(rng.integers(2, 4))))
    if kind == 2:
        return _number(rng)
    return f"{_word(rng, vocabulary)} {int(rng.integers(1, 1000))}"


def make_texts(n: int, seed: int, vocabulary: Sequence[str], avoid: set[str]) -> list[str]:
    """``n`` distinct lines, none of them in ``avoid``."""
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    while len(texts) < n:
        text = make_text(rng, vocabulary)
        if text not in avoid and text not in texts:
            texts.append(text)
    return texts


# --- images ------------------------------------------------------------------------------


def render(text: str, rng: np.random.Generator, hard: bool) -> np.ndarray:
    """Render one line as a uint8 gray image; ``hard`` adds gray, low contrast, blur, noise."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    font_file = font_dir / FONTS[int(rng.integers(len(FONTS)))]
    font = ImageFont.truetype(str(font_file), int(rng.integers(26, 40)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(4, 12))
    size = (right - left + 2 * pad, bottom - top + 2 * pad)
    if hard:  # tuned so the float model reads ~3/4 of the lines exactly
        background = int(rng.integers(90, 200))
        ink = max(0, background - int(rng.integers(42, 82)))
    else:
        background, ink = 255, 0
    image = Image.new("L", size, background)
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font, fill=ink)
    if not hard:
        return np.asarray(image)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.9, 1.7))))
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(12, 28), image.size[::-1])
    return np.clip(noisy, 0, 255).astype(np.uint8)


def resize_line(gray: np.ndarray) -> np.ndarray:
    """Resize to height 48 keeping the aspect ratio (rapidocr rounds the width up; cv2 linear)."""
    import cv2

    h, w = gray.shape
    width = int(math.ceil(HEIGHT * w / h))
    return cv2.resize(gray, (width, HEIGHT))


def to_feed(line: np.ndarray) -> dict[str, np.ndarray]:
    """A resized uint8 line [48, w] -> the model feed ``x`` [1, 3, 48, max(w, 320)]."""
    scaled = (line.astype(np.float32) / 255.0 - 0.5) / 0.5
    x = np.zeros((1, 3, HEIGHT, max(line.shape[1], MIN_WIDTH)), dtype=np.float32)
    x[0, :, :, : line.shape[1]] = scaled
    return {INPUT_NAME: x}


def rendered_lines(texts: Sequence[str], seed: int, hard: Sequence[bool]) -> Iterator[np.ndarray]:
    """The resized uint8 line of each text (one render stream per seed)."""
    rng = np.random.default_rng(seed)
    for text, is_hard in zip(texts, hard, strict=True):
        yield resize_line(render(text, rng, is_hard))


# --- decoding and metrics ------------------------------------------------------------------


def read_characters(onnx_path: Path) -> list[str]:
    """The CTC classes: blank, the dictionary stored in the model's metadata, then a space."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    metadata = {p.key: p.value for p in model.metadata_props}
    return ["<blank>", *metadata["character"].splitlines(), " "]


def ctc_decode(probs: np.ndarray, characters: Sequence[str]) -> str:
    """Greedy CTC: argmax per step, merge repeats, drop blanks (index 0)."""
    best = probs.argmax(axis=-1)
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    keep &= best != 0
    return "".join(characters[i] for i in best[keep])


def normalize_text(text: str) -> str:
    return " ".join(text.split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def recognize(session, lines: Sequence[np.ndarray], characters: Sequence[str]) -> list[str]:
    """Decoded text of each resized line, one batch-1 run per line."""
    return [ctc_decode(session.run(None, to_feed(line))[0][0], characters) for line in lines]


def score(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """(exact-match rate, character error rate), whitespace collapsed on both sides."""
    predictions = [normalize_text(p) for p in predictions]
    references = [normalize_text(r) for r in references]
    exact = np.mean([p == r for p, r in zip(predictions, references, strict=True)])
    errors = sum(edit_distance(p, r) for p, r in zip(predictions, references, strict=True))
    return float(exact), errors / sum(len(r) for r in references)


# --- build and evaluate --------------------------------------------------------------------


def _eval_texts() -> dict[str, list[str]]:
    _, eval_words = vocabularies()
    clean = make_texts(N_EVAL, EVAL_SEEDS["clean"], eval_words, avoid=set())
    hard = make_texts(N_EVAL, EVAL_SEEDS["hard"], eval_words, avoid=set(clean))
    return {"clean": clean, "hard": hard}


def write_calib(built: BuiltModel, out_dir: Path, n: int, seed: int = CALIB_SEED) -> list[Path]:
    """Write ``n`` feeds of rendered calibration lines, clean and hard alternating.

    Their words never occur in the evaluation lines, and no line equals an evaluation line.
    """
    calib_words, _ = vocabularies()
    avoid = {t for texts in _eval_texts().values() for t in texts}
    texts = make_texts(n, seed, calib_words, avoid)
    hard = [i % 2 == 1 for i in range(n)]
    lines = rendered_lines(texts, seed + 1000, hard)
    return write_feeds(out_dir, (to_feed(line) for line in lines), n)


def _lines(built: BuiltModel, name: str) -> list[np.ndarray]:
    with np.load(built.eval_dir / f"{name}.npz") as data:
        return [data[key] for key in sorted(data.files)]


def _make(built: BuiltModel) -> None:
    shutil.copyfile(source_model_path(), built.onnx_path)
    check_onnx(built.onnx_path)
    characters = read_characters(built.onnx_path)
    texts = _eval_texts()
    session = ort_session(built.onnx_path)
    meta = {"characters": characters, "texts": texts, "float_predictions": {}}
    for name in SETS:
        lines = list(
            rendered_lines(texts[name], EVAL_SEEDS[name] + 1000, [name == "hard"] * N_EVAL)
        )
        np.savez(built.eval_dir / f"{name}.npz", **{f"{i:04d}": x for i, x in enumerate(lines)})
        meta["float_predictions"][name] = recognize(session, lines, characters)
    (built.eval_dir / "eval.json").write_text(json.dumps(meta, ensure_ascii=False) + "\n")


def build(cache_dir: Path, n_calib: int = 64) -> BuiltModel:
    """Copy the recognizer into the cache and render calibration and evaluation lines."""
    return build_once(layout(cache_dir, NAME), RECIPE, _make, write_calib, n_calib)


def evaluate(onnx_path: Path, built: BuiltModel) -> dict[str, float]:
    """``exact_*`` (line exactly right) and ``cer_*`` on the clean and hard sets (200 each).

    The dictionary comes from the cache, not from ``onnx_path``: a quantizer may drop metadata.
    """
    meta = json.loads((built.eval_dir / "eval.json").read_text())
    session = ort_session(onnx_path)
    metrics = {}
    for name in SETS:
        predictions = recognize(session, _lines(built, name), meta["characters"])
        metrics[f"exact_{name}"], metrics[f"cer_{name}"] = score(predictions, meta["texts"][name])
    return metrics


MODEL = ZooModel(
    name=NAME,
    description="PP-OCRv4 text-line recognizer (CNN + attention, CTC) on rendered lines",
    primary_metric="exact_hard",
    build=build,
    evaluate=evaluate,
    write_calib=write_calib,
)
