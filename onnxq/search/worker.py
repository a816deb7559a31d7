"""Scoring a block's candidates, in this process or in worker processes.

A `BlockJob` holds everything a worker needs, sent once per block: the serialized suffix model
(ORT sessions cannot be pickled: each worker opens its own), the feeds with the block's cached
input, the reference outputs, the loss, the lifted scale inputs and their current values, and
which of them the block moves. A candidate is then only its vector of log-multipliers m:

    scales = current, with block scale i multiplied by e^{m_i}
    loss   = damage(reference outputs, suffix outputs on the feeds)

With `equal_feeds`, the loss is the mean over feeds of each feed's own loss instead of the loss
of all feeds pooled (onnxq.config.FeedWeighting). `score_feeds` also gives each feed's own loss
(the keep rule's paired per-feed test, onnxq.search.keep); a contrastive loss needs a batch of
rows, so per feed infoNCE is replaced by MSE there.

On the fused graph (`EmittedJob`) a candidate is instead the serialized model the emitter writes
with its scales: a worker opens a session for it (ORT fuses the constant-scale Q/DQ pairs into
integer kernels, as it will for the written model) and runs the whole model on the feeds.

The search opens one pool and shares each block's job with it once (`WorkerPool.share`); a
task is `(handle, m)`. `score_candidate` resolves the handle and opens the job's session the
first time a worker meets that job, then keeps both for the block's later candidates. It is
module-level so that process pools can ship it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.config import DamageMeasure
from onnxq.data import Feed
from onnxq.scoring import sessions
from onnxq.scoring.damage import search_loss
from onnxq.scoring.executor import Shared, resolve
from onnxq.scoring.sessions import SessionSettings


@dataclass(frozen=True)
class BlockJob:
    model: bytes
    settings: SessionSettings
    feeds: tuple[Feed, ...]
    reference: tuple[tuple[np.ndarray, ...], ...]  # [feed][output]
    output_names: tuple[str, ...]
    measure: DamageMeasure
    scales: dict[str, np.ndarray]  # lifted input name -> current scale
    moved: tuple[str, ...]  # the inputs a candidate's multipliers apply to, in order
    equal_feeds: bool = False  # the loss: mean of each feed's own (True) or pooled (False)


_WORKER: dict[str, object] = {}  # the job this worker scores: its key, the job, its session


def _job_and_session(handle: Shared) -> tuple[BlockJob, object]:
    """The job behind `handle` and its session, opened the first time this process meets it."""
    if _WORKER.get("key") != handle.key:
        job: BlockJob = resolve(handle)
        session = sessions.open_session(job.model, "the search model", job.settings)
        _WORKER.update(key=handle.key, job=job, session=session)
    return _WORKER["job"], _WORKER["session"]


@dataclass(frozen=True)
class EmittedJob:
    """What scoring candidates on the fused graph needs besides each candidate's model."""

    settings: SessionSettings
    feeds: tuple[Feed, ...]
    reference: tuple[tuple[np.ndarray, ...], ...]  # [feed][output]
    output_names: tuple[str, ...]
    measure: DamageMeasure
    equal_feeds: bool = False


def score_candidate(task: tuple[Shared, np.ndarray]) -> float:
    """The loss of the job's block with its moved scales times e^multipliers."""
    handle, multipliers = task
    job, session = _job_and_session(handle)
    return _pooled_loss(job, run_candidate(job, session, multipliers))


def score_feeds(task: tuple[Shared, np.ndarray]) -> tuple[float, np.ndarray]:
    """The loss of a candidate, as `score_candidate`, and the loss of each feed alone."""
    handle, multipliers = task
    job, session = _job_and_session(handle)
    return _losses(job, run_candidate(job, session, multipliers))


def score_emitted(task: tuple[Shared, bytes]) -> float:
    """The loss of an emitted candidate model (`EmittedJob`), run as ORT optimizes it."""
    handle, model = task
    job: EmittedJob = resolve(handle)
    return _pooled_loss(job, run_emitted(job, model))


def score_emitted_feeds(task: tuple[Shared, bytes]) -> tuple[float, np.ndarray]:
    """The loss of an emitted candidate model, as `score_emitted`, and each feed's own."""
    handle, model = task
    job: EmittedJob = resolve(handle)
    return _losses(job, run_emitted(job, model))


def run_emitted(job: EmittedJob, model: bytes) -> list[list[np.ndarray]]:
    """Outputs of an emitted candidate model on every feed of the job."""
    session = sessions.open_session(model, "a search candidate", job.settings)
    return [sessions.run(session, list(job.output_names), feed, "a search candidate") for feed in job.feeds]


def _pooled_loss(job: BlockJob | EmittedJob, outputs: list[list[np.ndarray]]) -> float:
    if job.equal_feeds:
        return _losses(job, outputs)[0]
    return float(search_loss(job.measure, [list(r) for r in job.reference], outputs))


def _losses(job: BlockJob | EmittedJob, outputs: list[list[np.ndarray]]) -> tuple[float, np.ndarray]:
    """The job's loss of `outputs` and each feed's own loss."""
    reference = [list(r) for r in job.reference]
    per_feed = DamageMeasure.MSE if job.measure is DamageMeasure.INFONCE else job.measure
    alone = np.asarray([search_loss(per_feed, [ref], [got])
                        for ref, got in zip(reference, outputs, strict=True)], np.float64)
    loss = float(np.mean(alone)) if job.equal_feeds else float(search_loss(job.measure, reference, outputs))
    return loss, alone


def release_worker() -> None:
    """Drop the job and session this process holds."""
    _WORKER.clear()


def run_candidate(job: BlockJob, session: object, multipliers: np.ndarray) -> list[list[np.ndarray]]:
    """Outputs of the suffix on every feed with the candidate's scales."""
    scales = candidate_scales(job.scales, job.moved, multipliers)
    return [sessions.run(session, list(job.output_names), {**feed, **scales}, "the search model")
            for feed in job.feeds]


def candidate_scales(current: dict[str, np.ndarray], moved: tuple[str, ...],
                     multipliers: np.ndarray) -> dict[str, np.ndarray]:
    """`current` with each moved scale times e^m (float32, as the model reads them)."""
    scales = dict(current)
    for name, multiplier in zip(moved, np.asarray(multipliers, np.float64), strict=True):
        scales[name] = np.asarray(current[name].astype(np.float64) * np.exp(multiplier), np.float32)
    return scales
