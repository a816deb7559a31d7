"""How far a quantized model's outputs are from the float model's: every measure, defined once.

Damage measures (all >= 0, 0 when the outputs equal float's), per output then averaged; rows
are the last axis of every feed's output, pooled over the feeds (a scalar output is one row):

    mse      sum ||y_q - y||^2 / sum ||y||^2 over the feeds (noise-to-signal energy)
    kl       KL(softmax(y) || softmax(y_q)) over the last axis, averaged over rows
    infonce  the contrastive loss of quantized rows against float rows (each row must pick
             its own float row among the others, temperature 0.1; rows of all feeds pooled,
             at most 512 of them, evenly spaced), minus the same loss of float against itself

They are looked up by name in `DAMAGE_MEASURES` or by `DamageMeasure` (the enum that
`QuantConfig.sensitivity` holds); `output_damage` takes either.

Similarities, for fidelity reports (onnxq.scoring.fidelity):

    cosine          <y, y_q> / (|y| |y_q|) in float64, flattened (1.0 when both are zero)
    top1_matches    per row, argmax y == argmax y_q (the decision a classifier makes)
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import numpy as np

from onnxq.config import DamageMeasure
from onnxq.numerics import cosine

__all__ = ["DAMAGE_MEASURES", "INFONCE_MAX_ROWS", "INFONCE_TEMPERATURE", "DamageMeasure", "Outputs",
           "cosine", "damage_function", "output_damage", "top1_matches"]

INFONCE_TEMPERATURE = 0.1
INFONCE_MAX_ROWS = 512

Outputs = list[list[np.ndarray]]  # [feed][output]


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _rows(outputs: Outputs, index: int) -> np.ndarray:
    """Output `index` of every feed as rows over its last axis. Where that axis differs between
    feeds (an NCHW feature map of varying width, e.g. a block output of a text recognizer), the
    rows are the channel vectors (axis 1) instead."""
    arrays = [np.asarray(feed[index], np.float64) for feed in outputs]
    if len({a.shape[-1] for a in arrays if a.ndim}) > 1 and all(a.ndim >= 3 for a in arrays):
        arrays = [np.moveaxis(a, 1, -1) for a in arrays]
    return np.concatenate([a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1) for a in arrays])


def _mse(reference: np.ndarray, quantized: np.ndarray) -> float:
    return float(np.sum((quantized - reference) ** 2) / max(np.sum(reference ** 2), 1e-30))


def _kl(reference: np.ndarray, quantized: np.ndarray) -> float:
    p, q = _softmax(reference), _softmax(quantized)
    return float(np.mean(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30)), axis=-1)))


def _contrastive_loss(anchors: np.ndarray, targets: np.ndarray) -> float:
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-30)

    logits = unit(anchors) @ unit(targets).T / INFONCE_TEMPERATURE
    logits -= logits.max(axis=-1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return float(-np.mean(np.diagonal(log_softmax)))


def _infonce_excess(reference: np.ndarray, quantized: np.ndarray) -> float:
    """The contrastive loss of quantized rows against float rows, minus float's against itself
    (negative when the quantized rows happen to separate better)."""
    if len(reference) > INFONCE_MAX_ROWS:
        keep = np.linspace(0, len(reference) - 1, INFONCE_MAX_ROWS).astype(int)
        reference, quantized = reference[keep], quantized[keep]
    return _contrastive_loss(quantized, reference) - _contrastive_loss(reference, reference)


def _infonce(reference: np.ndarray, quantized: np.ndarray) -> float:
    return max(_infonce_excess(reference, quantized), 0.0)


DAMAGE_MEASURES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    DamageMeasure.MSE.value: _mse, DamageMeasure.KL.value: _kl, DamageMeasure.INFONCE.value: _infonce}


def damage_function(measure: DamageMeasure | str) -> Callable[[np.ndarray, np.ndarray], float]:
    """The measure of rows (reference, quantized) -> damage, by enum or by name."""
    name = measure.value if isinstance(measure, enum.Enum) else measure
    try:
        return DAMAGE_MEASURES[name]
    except KeyError:
        raise KeyError(f"unknown damage measure {name!r}; choose one of "
                       f"{', '.join(DAMAGE_MEASURES)}") from None


def output_damage(measure: DamageMeasure | str, reference: Outputs, quantized: Outputs) -> float:
    """The damage of `quantized` outputs against `reference`, averaged over the outputs."""
    function = damage_function(measure)
    count = len(reference[0])
    return float(np.mean([function(_rows(reference, i), _rows(quantized, i)) for i in range(count)]))


def search_loss(measure: DamageMeasure | str, reference: Outputs, quantized: Outputs) -> float:
    """The objective of a scale search: `output_damage`, but infoNCE is not clipped at 0, so
    that candidates still rank when they are all as separable as float (Evol-Q's loss)."""
    name = measure.value if isinstance(measure, enum.Enum) else measure
    function = _infonce_excess if name == DamageMeasure.INFONCE.value else damage_function(name)
    count = len(reference[0])
    return float(np.mean([function(_rows(reference, i), _rows(quantized, i)) for i in range(count)]))


def top1_matches(reference_rows: np.ndarray, quantized_rows: np.ndarray) -> list[bool]:
    """Per row (last axis), whether the quantized row's argmax is the reference row's."""
    return (reference_rows.argmax(-1) == quantized_rows.argmax(-1)).tolist()
