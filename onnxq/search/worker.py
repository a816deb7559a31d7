"""Scoring a block's candidates, in this process or in worker processes.

A `BlockJob` holds everything a worker needs, sent once per block: the serialized suffix model
(ORT sessions cannot be pickled: each worker opens its own), the feeds with the block's cached
input, the reference outputs, the loss, the lifted scale inputs and their current values, and
which of them the block moves. A candidate is then only its vector of log-multipliers m:

    scales = current, with block scale i multiplied by e^{m_i}
    loss   = damage(reference outputs, suffix outputs on the feeds)

`init_block_worker(job)` keeps the session and the job in this module (one per process);
`score_candidate(m)` runs it. Both are module-level so that process pools can ship them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq.config import DamageMeasure
from onnxq.data import Feed
from onnxq.scoring import sessions
from onnxq.scoring.damage import search_loss
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


_WORKER: dict[str, object] = {}


def init_block_worker(job: BlockJob) -> None:
    """Open the job's session in this process and keep both for `score_candidate`."""
    _WORKER["job"] = job
    _WORKER["session"] = sessions.open_session(job.model, "the search model", job.settings)


def score_candidate(multipliers: np.ndarray) -> float:
    """The loss of the job's block with its moved scales times e^multipliers."""
    job: BlockJob = _WORKER["job"]
    return float(search_loss(job.measure, [list(r) for r in job.reference],
                               run_candidate(job, _WORKER["session"], multipliers)))


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
