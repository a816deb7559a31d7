"""Verify a quantized model before it is written, and measure its fidelity to the float one.

Checks, in order: the ONNX checker, an ORT session on the quantized model, and each output
against the float model's on held-out feeds (mean cosine, SQNR in dB, max abs error, and
top-1 agreement for outputs that look like class scores; onnxq.scoring.damage defines cosine
and top-1). A configured floor on cosine turns a poor result into a `VerificationError`:
nothing is written.

The float side is anything with a session's `get_outputs()` and `run(names, feed)`: an ORT
session, or an `onnxq.scoring.scorer.Reference` that replays float outputs computed once per
feed (the allocator's repeated `--max-drop` checks then never run the float model again).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.data import Feed
from onnxq.errors import ModelError, VerificationError
from onnxq.model_io import check_model
from onnxq.scoring import damage
from onnxq.scoring.sessions import open_session


@dataclass(frozen=True)
class OutputFidelity:
    """How closely one output of the quantized model follows the float model."""

    name: str
    cosine: float
    min_cosine: float
    sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None


@dataclass(frozen=True)
class FidelityReport:
    outputs: tuple[OutputFidelity, ...]
    feeds: int
    held_out: bool

    @property
    def worst_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)


def _looks_like_scores(array: np.ndarray) -> bool:
    """Class scores per sample (N, C) or per step of a sequence (N, T, C): the last axis is a
    class axis only there. An image-like output (N, C, H, W), such as a one-channel heatmap,
    has none: an argmax along its width would measure nothing (cosine over the whole tensor
    does)."""
    return array.ndim in (2, 3) and array.shape[-1] > 1


def measure_fidelity(float_session: ort.InferenceSession, quant_session: ort.InferenceSession,
                     feeds: Iterable[Feed], held_out: bool = True) -> FidelityReport:
    """Compare every output of two sessions over the feeds (either may be any object with a
    session's `get_outputs()` and `run(names, feed)`, e.g. a cached float `Reference`)."""
    names = [o.name for o in float_session.get_outputs()]
    cosines: dict[str, list[float]] = {n: [] for n in names}
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    max_error = dict.fromkeys(names, 0.0)
    agree: dict[str, list[float]] = {n: [] for n in names}
    count = 0
    for feed in feeds:
        count += 1
        reference = float_session.run(names, feed)
        quantized = quant_session.run(names, feed)
        for name, ref, got in zip(names, reference, quantized, strict=True):
            ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
            if _looks_like_scores(ref64):
                rows_ref = ref64.reshape(-1, ref64.shape[-1])
                rows_got = got64.reshape(-1, got64.shape[-1])
                cosines[name].extend(damage.cosine(r, g) for r, g in zip(rows_ref, rows_got,
                                                                           strict=True))
                agree[name].extend(damage.top1_matches(rows_ref, rows_got))
            else:
                cosines[name].append(damage.cosine(ref64, got64))
            signal[name] += float(np.sum(ref64**2))
            noise[name] += float(np.sum((ref64 - got64) ** 2))
            max_error[name] = max(max_error[name], float(np.max(np.abs(ref64 - got64), initial=0)))
    outputs = []
    for name in names:
        sqnr = float("inf") if noise[name] == 0 else 10 * np.log10(max(signal[name], 1e-300) / noise[name])
        outputs.append(OutputFidelity(
            name=name,
            cosine=float(np.mean(cosines[name])) if cosines[name] else 1.0,
            min_cosine=float(np.min(cosines[name])) if cosines[name] else 1.0,
            sqnr_db=float(sqnr),
            max_abs_error=max_error[name],
            top1_agreement=float(np.mean(agree[name])) if agree[name] else None))
    return FidelityReport(tuple(outputs), count, held_out)


def verify(quantized: onnx.ModelProto, float_session: ort.InferenceSession, feeds: Iterable[Feed],
           held_out: bool, min_cosine: float | None) -> tuple[ort.InferenceSession, FidelityReport]:
    """Check the quantized model and measure it; raise VerificationError if it falls short.
    `float_session`: an ORT session on the float model or its cached `Reference`."""
    try:
        check_model(quantized, "the quantized model")
        session = open_session(quantized, "the quantized model")
    except ModelError as error:
        raise VerificationError(str(error)) from None
    report = measure_fidelity(float_session, session, feeds, held_out)
    if min_cosine is not None and report.worst_cosine < min_cosine:
        worst = min(report.outputs, key=lambda o: o.cosine)
        raise VerificationError(f"output {worst.name}: cosine to float {worst.cosine:.4f} on "
                                f"{report.feeds} held-out feeds is below min_cosine {min_cosine}; "
                                f"nothing written")
    return session, report
