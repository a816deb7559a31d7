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

On the fused graph (`EmittedJob`) a candidate is instead its scales: the worker emits the model
the emitter writes with them (`CandidateEmitter`, the prepared model sent once per job), opens a
session for it (ORT fuses the constant-scale Q/DQ pairs into integer kernels, as it will for the
written model) and runs the whole model on the feeds. Emitting in the workers keeps the main
process from serializing the search: it only draws candidates.

The search opens one pool and shares each block's job with it once (`WorkerPool.share`); a
task is `(handle, m)`. `score_candidate` resolves the handle and opens the job's session the
first time a worker meets that job, then keeps both for the block's later candidates. It is
module-level so that process pools can ship it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import model_io
from onnxq.config import DamageMeasure
from onnxq.data import Feed
from onnxq.emit import EmitOptions, emit
from onnxq.plan import QuantPlan, WeightQuant
from onnxq.qparams import QParams
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
    ceilings: dict[str, np.float32] = dataclasses.field(default_factory=dict)  # input name -> cap


# the job this worker scores: its key, the job, and what it loaded for it (the lifted job's
# session, or the fused job's prepared model and the bytes it was loaded from, which the
# search and selection jobs of one search share)
_WORKER: dict[str, object] = {}


def _job_and_session(handle: Shared) -> tuple[BlockJob, object]:
    """The job behind `handle` and its session, opened the first time this process meets it."""
    if _WORKER.get("key") != handle.key:
        job: BlockJob = resolve(handle)
        session = sessions.open_session(job.model, "the search model", job.settings)
        _WORKER.update(key=handle.key, job=job, loaded=session, source=None)
    return _WORKER["job"], _WORKER["loaded"]


@dataclass(frozen=True)
class CandidateEmitter:
    """What emitting a candidate model needs besides its scales: the prepared model (serialized:
    onnx-ir models cannot be pickled), its plan, the base qparams, the searched weights (key ->
    spec) and the emitter's options."""

    model: bytes
    plan: QuantPlan
    qparams: QParams
    weights: dict[str, WeightQuant]
    options: EmitOptions

    def emitted(self, prepared: ir.Model, scales: dict[str, np.ndarray]) -> bytes:
        """The serialized model the emitter writes from `prepared` (this emitter's model, loaded)
        with `scales` (every searched scale, by group)."""
        qparams = with_scales(self.qparams, scales, self.weights)
        return model_io.to_proto(emit(prepared, self.plan, qparams, self.options)).SerializeToString()


@dataclass(frozen=True)
class EmittedJob:
    """What scoring candidates on the fused graph needs besides each candidate's scales."""

    emitter: CandidateEmitter
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


def score_emitted(task: tuple[Shared, dict[str, np.ndarray]]) -> float:
    """The loss of the model emitted with a candidate's scales (`EmittedJob`), run as ORT
    optimizes it."""
    handle, scales = task
    job, prepared = _job_and_prepared(handle)
    return _pooled_loss(job, run_emitted(job, job.emitter.emitted(prepared, scales)))


def score_emitted_feeds(task: tuple[Shared, dict[str, np.ndarray]]) -> tuple[float, np.ndarray]:
    """The loss of an emitted candidate, as `score_emitted`, and each feed's own."""
    handle, scales = task
    job, prepared = _job_and_prepared(handle)
    return _losses(job, run_emitted(job, job.emitter.emitted(prepared, scales)))


def _job_and_prepared(handle: Shared) -> tuple[EmittedJob, ir.Model]:
    """The fused job behind `handle` and its prepared model, loaded the first time this process
    meets the job, unless the job before it carried the same model."""
    if _WORKER.get("key") != handle.key:
        job: EmittedJob = resolve(handle)
        source = job.emitter.model
        prepared = _WORKER["loaded"] if _WORKER.get("source") is source else \
            ir.from_proto(onnx.load_from_string(source))
        _WORKER.update(key=handle.key, job=job, loaded=prepared, source=source)
    return _WORKER["job"], _WORKER["loaded"]


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
    scales = candidate_scales(job.scales, job.moved, multipliers, job.ceilings)
    return [sessions.run(session, list(job.output_names), {**feed, **scales}, "the search model")
            for feed in job.feeds]


def with_scales(qparams: QParams, scales: dict[str, np.ndarray],
                weights: dict[str, WeightQuant] | None = None) -> QParams:
    """A copy of `qparams` whose activation groups have the given scales (ranges moved with) and
    whose weights in `weights` (key -> spec) have their scales times the given multiplier."""
    activations, weight_params = dict(qparams.activations), dict(qparams.weights)
    for key, scale in scales.items():
        if weights and key in weights:
            params = weight_params[weights[key]]
            moved = (np.asarray(params.scale, np.float32) * np.float32(scale)).astype(np.float32)
            weight_params[weights[key]] = dataclasses.replace(params, scale=moved)
            continue
        params = activations[key]
        factor = float(scale) / float(params.scale)
        activations[key] = dataclasses.replace(params, scale=np.float32(scale), lo=params.lo * factor,
                                               hi=params.hi * factor)
    return dataclasses.replace(qparams, activations=activations, weights=weight_params)


def candidate_scales(current: dict[str, np.ndarray], moved: tuple[str, ...], multipliers: np.ndarray,
                     ceilings: Mapping[str, np.float32] | None = None) -> dict[str, np.ndarray]:
    """`current` with each moved scale times e^m (float32, as the model reads them), capped at
    its ceiling where it has one (onnxq.search.bounds)."""
    scales = dict(current)
    ceilings = ceilings or {}
    for name, multiplier in zip(moved, np.asarray(multipliers, np.float64), strict=True):
        scaled = current[name].astype(np.float64) * np.exp(multiplier)
        if name in ceilings:
            scaled = np.minimum(scaled, np.float64(ceilings[name]))
        scales[name] = np.asarray(scaled, np.float32)
    return scales
