"""The state of one quantization run, and the `Stage` protocol its stages follow.

    load -> prepare -> [every stage's observers, one calibration pass through ORT]
         -> ranges -> allocate? -> weights -> bias -> sequential comq? -> emit -> verify

`QuantState` is the one object the stages share: the prepared model and its node index, the
plan, the parameters chosen so far, the calibration and held-out feeds, the Scorer (the one
owner of ORT sessions), reports and timings. A stage reads what earlier stages left and adds
its own part; no stage calls another.

A `Stage` has a name, `observe(state)`: called once before the calibration pass, it sets up
what the stage needs from calibration and returns the tensors it watches with their observers
(statistics, channel means, Gram matrices); and `run(state)`. `run_stages` merges every
stage's observers into the single calibration pass, then runs the stages in order, timing
each.

Memory stays bounded for models past 2 GB: the float model read from a file keeps its weights
in the file (mapped when read), the float session is closed once the held-out outputs are
computed, and a prepared model whose new weights (SmoothQuant's) pass
`model_io.EXTERNAL_DATA_THRESHOLD` is spilled to a temporary external-data file
(`spill_weights`). After each stage the pages read from mapped weights are let go
(`model_io.unmap`), so at most one copy of the weights is resident at a time.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import onnx
import onnx_ir as ir

from onnxq import model_io
from onnxq.calibration import calibrate
from onnxq.config import QuantConfig
from onnxq.data import CalibrationSet
from onnxq.index import ModelIndex
from onnxq.plan import QuantPlan
from onnxq.qparams import QParams
from onnxq.report.provenance import Provenance
from onnxq.scoring.scorer import Scorer

# Called as progress(stage, advance, total).
ProgressCallback = Callable[[str, int, int], None]
Observers = Mapping[str, Sequence[calibrate.Observer]]


@dataclass
class QuantState:
    """Everything one run knows; filled in by the stages in data-flow order."""

    config: QuantConfig
    float_model: onnx.ModelProto
    source: str | None
    scorer: Scorer
    float_session: object  # the float model in ORT (the reference every fidelity is measured on)
    calibration: CalibrationSet
    held_out: CalibrationSet
    provenance: Provenance | None = None  # the float model's and the data's digests, versions
    progress: ProgressCallback | None = None
    model: ir.Model | None = None  # the prepared float model
    index: ModelIndex | None = None
    plan: QuantPlan | None = None
    qparams: QParams = field(default_factory=QParams)
    # Set up by stages before calibration, used by later ones: the weight searcher
    # (onnxq.weights.registry.WeightSearcher) and the bias corrector (onnxq.stages.bias).
    weights: object | None = None
    biases: object | None = None
    quantized: onnx.ModelProto | None = None
    reports: dict[str, object] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    scratch: tempfile.TemporaryDirectory | None = None  # where spilled weights live

    @property
    def float_bytes(self) -> int:
        # ByteSize fails past 2 GB; a model read from a file may keep its weights there
        return model_io.serialized_size(self.float_model) + model_io.external_tensor_bytes(self.float_model)

    def spill_weights(self) -> None:
        """Past `EXTERNAL_DATA_THRESHOLD` bytes of weights in memory, move the prepared model's
        weights to a temporary external-data file (mapped when read) that lives with the state.
        Pages read from mapped weights so far are let go either way (those of weights that were
        replaced when their tensors are collected: graphs are cyclic, so collect now)."""
        gc.collect()
        model_io.unmap(self.model)
        if model_io.in_memory_bytes(self.model) <= model_io.EXTERNAL_DATA_THRESHOLD:
            return
        if self.scratch is None:
            self.scratch = tempfile.TemporaryDirectory(prefix="onnxq-weights-", ignore_cleanup_errors=True)
        model_io.spill(self.model, tempfile.mkdtemp(dir=self.scratch.name))  # a new file each time

    @property
    def fidelity_feeds(self) -> CalibrationSet:
        """Held-out feeds, or the calibration feeds when none are held out."""
        return self.held_out if len(self.held_out) else self.calibration

    @cached_property
    def timing_feed(self) -> dict:
        """The feed models are timed on (the written model, `max_latency`, `auto`): the one of
        median size (input elements; ties: the first) among the held-out and calibration feeds,
        the deployment's typical input. A ratio to float depends on the input's size: per-run
        costs that do not grow with it (a 4-bit Conv weight's DequantizeLinear) weigh more on a
        small input. PP-OCRv4 under `max_latency 1`, allocated on its widest line (48 x 582
        pixels), measured 1.11x float on its typical 48 x 320 line; the benchmarks time the
        median feed too."""
        feeds = [self.fidelity_feeds.feed(i) for i in range(len(self.fidelity_feeds))]
        if self.fidelity_feeds is not self.calibration:
            feeds += [self.calibration.feed(i) for i in range(len(self.calibration))]
        sizes = [sum(value.size for value in feed.values()) for feed in feeds]
        order = sorted(range(len(feeds)), key=lambda index: (sizes[index], index))
        return feeds[order[len(order) // 2]]

    def stage_progress(self, stage: str, total: int) -> Callable[[int], None] | None:
        """A progress callback for `total` steps of `stage` (None without a display)."""
        if self.progress is None:
            return None
        progress = self.progress
        progress(stage, 0, total)
        return lambda advance: progress(stage, advance, total)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class Stage(Protocol):
    name: str

    def observe(self, state: QuantState) -> Observers: ...

    def run(self, state: QuantState) -> None: ...


def run_stages(state: QuantState, stages: Sequence[Stage]) -> None:
    """One calibration pass for every stage's observers, then each stage in order."""
    observers: dict[str, list[calibrate.Observer]] = {}
    for stage in stages:
        for tensor, watching in stage.observe(state).items():
            observers.setdefault(tensor, []).extend(watching)
    with state.timed("calibrate"):
        calibrate.observe(state.model, observers, state.calibration,
                          state.stage_progress("calibrate", len(state.calibration)), state.scorer.settings)
    for stage in stages:
        model_io.unmap(state.model)
        with state.timed(stage.name):
            stage.run(state)
