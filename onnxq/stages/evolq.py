"""Evol-Q as a stage: activation scales and weight-scale multipliers searched block by block,
every candidate scored through ONNX Runtime against the float model on calibration feeds
(onnxq.search).

    emit (current qparams) -> lift the searched scales to graph inputs (onnxq.search.graph)
    blocks between cuts of the graph (onnxq.search.blocks)
    per pass, per block, first to last:
        evolve log-multipliers of the block's scales; a candidate is scored on the fused graph
          (emitted with its scales, its own session, the whole model) or on the lifted one
          (from the block's input, cached from the model quantized so far, through the rest of
          the model: global loss, or to the next cut: local loss)
        keep the best only if it also improves the selection feeds (calibration feeds the search
          never scored: selection never sees evaluation data), in a paired, per-feed way: the
          pooled loss falls and most feeds' own losses fall (onnxq.search.keep)
    accept the searched scales only if the model they make is at least as close to float on the
    held-out calibration feeds (the verify stage's; worst output's mean cosine) as the model
    with the base scales; else the base scales stay, and the report says why (both cosines)
    write the accepted scales back into qparams; the emit and verify stages then write and check
    the model with constant scales, as without the search

With `[evolq] scales = "auto"` (the default) the search runs twice from the same base, once
over the activation scales and once over the weight multipliers, and the acceptance writes
whichever the held-out feeds find closer to float (or the base): which kind helps differs by
model, and only calibration data chooses.

On the fused graph (`[evolq] graph = "fused"`, the default) a candidate is the model the
emitter writes with its scales, opened as a session of its own and run whole on the search
feeds: ORT fuses its constant-scale Q/DQ pairs into integer kernels (QLinearConv, QGemm ...),
so a candidate scores exactly what will run. The lifted graph cannot be fused (its scales are
inputs) and runs every DequantizeLinear -> float op -> QuantizeLinear as written; on PP-OCRv4
the two disagree by far more than the moves the search compares (benchmarks/results/evolq.md).

The two checks exist because the search loss pools the feeds: at 4-bit weights a few feeds with
large errors carried it on PP-OCRv4, and a search whose kept blocks each lowered the pooled
selection loss still made the held-out cosine fall (0.986 -> 0.960). The keep rule counts every
selection feed equally; the acceptance makes the search never write a model that the held-out
feeds find worse than its base (ties accepted: equal fidelity is not a loss).

Randomness comes from `config.seed` (per block and pass), so the same inputs give the same
model. Candidates are scored by `config.workers` workers (`config.executor`: local processes
or Ray), one pool for the whole search: each block's job is shared with it once, and each
worker opens that block's session on its first candidate.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq import model_io
from onnxq.config import FeedWeighting, LossScope, ScaleSearch, SearchedScales, SearchGraph, Strategy
from onnxq.data import Feed
from onnxq.emit import emit, emit_options
from onnxq.plan import BiasQuant
from onnxq.qparams import QParams
from onnxq.scoring.executor import Shared, WorkerPool, open_pool, threads_per_worker
from onnxq.scoring.scorer import batch_feeds
from onnxq.scoring.sessions import SessionSettings, needs_external_data
from onnxq.search.blocks import Block, partition
from onnxq.search.bounds import fusion_ceilings
from onnxq.search.evolution import EvolutionSettings, SearchResult, evolve, random_search
from onnxq.search.graph import (
    BLOCK_INPUT,
    BiasSource,
    LiftedScales,
    lift_scales,
    suffix_model,
    with_outputs,
)
from onnxq.search.keep import KeepDecision, decide
from onnxq.search.worker import (
    BlockJob,
    CandidateEmitter,
    EmittedJob,
    candidate_scales,
    release_worker,
    score_candidate,
    score_emitted,
    score_emitted_feeds,
    score_feeds,
    with_scales,
)
from onnxq.stages.bias import float_bias
from onnxq.state import Observers, QuantState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockReport:
    """One block's search: its groups, evaluations, loss on the search feeds before / after,
    the same on the selection feeds (pooled), the keep rule's per-feed figures (median relative
    change of a feed's loss, feeds improved), and whether the result was kept."""

    groups: tuple[str, ...]
    input: str | None
    evaluations: int
    loss_before: float
    loss_after: float
    selection_before: float | None
    selection_after: float | None
    kept: bool
    seconds: float
    selection_median_change: float | None = None
    selection_improved: int | None = None


@dataclass(frozen=True)
class Acceptance:
    """The final check: the worst output's mean cosine to float on the held-out calibration
    feeds, of the model with the base scales and of the one with the searched scales."""

    feeds: int
    base_cosine: float | None
    searched_cosine: float | None
    accepted: bool
    reason: str
    chosen: str | None = None  # with scales = auto: the kind whose search was written


@dataclass(frozen=True)
class SearchReport:
    loss: str
    scope: str
    strategy: str
    seed: int
    search_feeds: int
    selection_feeds: int
    blocks: tuple[BlockReport, ...]
    seconds: float
    acceptance: Acceptance | None = None
    scales: str = "activations"
    graph: str = "lifted"

    @property
    def evaluations(self) -> int:
        return sum(block.evaluations for block in self.blocks)


class EvolqSearch:
    name = "evolq"

    @staticmethod
    def wanted(state: QuantState) -> bool:
        return state.config.search is ScaleSearch.EVOLQ

    def observe(self, state: QuantState) -> Observers:
        return {}

    def run(self, state: QuantState) -> None:
        start = time.perf_counter()
        settings = state.config.evolq
        search, selection = _split(state, settings.search_feeds, settings.selection_feeds)
        kinds = [SearchedScales.ACTIVATIONS, SearchedScales.WEIGHTS] \
            if settings.scales is SearchedScales.AUTO else [settings.scales]
        runs = {kind: lifted_blocks(state, kind) for kind in kinds}
        progress = state.stage_progress(self.name, sum(len(b) for _, b in runs.values()) * settings.passes)
        searched, reports, fused = {}, [], True
        with open_pool(state.config.executor, state.config.workers) as pool:
            for kind, (lifted, blocks) in runs.items():
                runner = _BlockRunner(state, lifted, blocks, search, selection)
                kind_reports = _search_blocks(state, runner, blocks, pool, progress)
                reports += kind_reports
                fused = fused and runner.fused
                if any(r.kept for r in kind_reports):
                    searched[kind.value] = with_scales(state.qparams, runner.current, lifted.weights)
        release_worker()  # the last block's session, when it was scored in this process
        acceptance = accept(state, searched) if searched else None
        if acceptance is not None and acceptance.accepted:
            state.qparams = searched[acceptance.chosen]
        elif acceptance is not None:
            logger.info("search rejected: %s", acceptance.reason)
        state.reports["search"] = SearchReport(
            settings.loss.value, settings.scope.value, settings.strategy.value, state.config.seed,
            len(search), len(selection), tuple(reports), time.perf_counter() - start, acceptance,
            settings.scales.value, (SearchGraph.FUSED if fused else SearchGraph.LIFTED).value)


def _search_blocks(state: QuantState, runner: _BlockRunner, blocks: list[Block], pool: WorkerPool,
                   progress: Callable[[int], None] | None) -> list[BlockReport]:
    """Every pass over the blocks, first to last; the runner keeps what each block found."""
    settings = state.config.evolq
    per_block = max(settings.population, settings.budget // max(len(blocks) * settings.passes, 1))
    reports = []
    for number in range(settings.passes):
        for index, block in enumerate(blocks):
            rng = np.random.default_rng([state.config.seed, number, index])
            reports.append(runner.search(pool, block, per_block, rng))
            if progress is not None:
                progress(1)
    return reports


def lifted_blocks(state: QuantState, scales: SearchedScales) -> tuple[LiftedScales, list[Block]]:
    """The search model of the state's emitted model (the scales `scales` names lifted to
    inputs; not auto, which is two searches) and its blocks, each holding only lifted scales."""
    settings = state.config.evolq
    quantized = emit(state.model, state.plan, state.qparams, emit_options(state.config))
    weights = [spec for spec in state.plan.weights if spec in state.qparams.weights] \
        if scales is not SearchedScales.ACTIVATIONS else []
    lifted = lift_scales(quantized, state.plan, bias_sources(state), weights)
    # every lifted scale is fed; a block moves only the kinds the settings name, one kind at a
    # time: with both, a block's activation scales are searched, then its weight multipliers
    # (searched together, the weights' small steps drown in the activations': measured on
    # EfficientNet-Lite0 W8A8, no block of 6 kept against 2 with activations alone)
    activations = set(lifted.inputs) - set(lifted.weights)
    kinds = {SearchedScales.ACTIVATIONS: [activations], SearchedScales.WEIGHTS: [set(lifted.weights)],
             SearchedScales.BOTH: [activations, set(lifted.weights)]}[scales]
    layers = {key: spec.node for key, spec in lifted.weights.items()}
    blocks = [dataclasses.replace(b, groups=tuple(g for g in b.groups if g in kind))
              for b in partition(state.model, state.plan, settings.min_block_groups, settings.max_blocks,
                                 layers)
              for kind in kinds]
    return lifted, [b for b in blocks if b.groups]


def accept(state: QuantState, searched: dict[str, QParams]) -> Acceptance:
    """Which searched scales (by kind) make the model closest to float on the held-out
    calibration feeds, and whether that one is at least as close as the base scales (the
    emitted models, as the verify stage measures). Ties go to the first kind, then the base."""
    feeds = state.held_out
    first = next(iter(searched))
    if not len(feeds):
        return Acceptance(0, None, None, True, "not checked: no held-out calibration feeds", first)

    def worst_cosine(qparams: QParams) -> float:
        model = model_io.to_proto(emit(state.model, state.plan, qparams, emit_options(state.config)))
        return state.scorer.measure_fidelity(model, state.float_session, feeds).worst_cosine

    base = worst_cosine(state.qparams)
    cosines = {kind: worst_cosine(qparams) for kind, qparams in searched.items()}
    chosen = max(cosines, key=lambda kind: cosines[kind])  # max keeps the first of equals
    accepted = cosines[chosen] >= base
    verdict = "accepted" if accepted else "rejected, base scales written"
    searched_words = ", ".join(f"{cosine:.5f} with the searched {kind} scales"
                               for kind, cosine in cosines.items())
    return Acceptance(len(feeds), base, cosines[chosen], accepted,
                      f"{verdict}: held-out cosine {searched_words} against {base:.5f} with the base "
                      f"scales on {len(feeds)} held-out calibration feeds", chosen)


def bias_sources(state: QuantState) -> dict[BiasQuant, BiasSource]:
    """The float bias and weight scales the emitter rounds each bias from."""
    sources = {}
    for spec in state.plan.biases:
        weight = state.plan.weight_of(spec.node)
        if weight is not None and weight in state.qparams.weights:
            sources[spec] = BiasSource(float_bias(state, spec),
                                      state.qparams.weights[weight].channel_scales())
    return sources


def _split(state: QuantState, search: int, selection: int) -> tuple[list[Feed], list[Feed]]:
    """Search and selection feeds: disjoint, drawn from the calibration feeds by the seed."""
    order = np.random.default_rng(state.config.seed).permutation(len(state.calibration))
    chosen = [state.calibration.feed(int(i)) for i in order]
    selection = min(selection, max(len(chosen) - 1, 0) // 3)
    return chosen[selection:selection + search], chosen[:selection]


class _BlockRunner:
    """The block inputs of the model quantized so far, the float references, and the search of
    one block through a pool of workers."""

    def __init__(self, state: QuantState, lifted: LiftedScales, blocks: list[Block],
                 search: list[Feed], selection: list[Feed]) -> None:
        self.state, self.lifted = state, lifted
        self.current = {group: lifted.defaults[group] for group in lifted.inputs}
        # scales capped where raising them would leave a Clip in float (onnxq.search.bounds)
        self.ceilings = fusion_ceilings(state.model, state.plan, state.qparams)
        self.local = state.config.evolq.scope is LossScope.LOCAL
        cuts = sorted({tensor for b in blocks for tensor in (b.input, b.output) if tensor is not None})
        free = all(value.shape is not None and len(value.shape) and not isinstance(value.shape[0], int)
                   for value in state.model.graph.inputs)
        # selection feeds one by one: the keep rule compares each feed's loss before and after
        self.equal_feeds = state.config.evolq.feed_weighting is FeedWeighting.EQUAL
        self.feeds = {"search": list(search) if self.equal_feeds else batch_feeds(search, free),
                      "selection": list(selection)}
        # a candidate travels to its session as bytes: past 2 GB the lifted graph scores instead
        self.fused = state.config.evolq.graph is SearchGraph.FUSED and not needs_external_data(lifted.model)
        if state.config.evolq.graph is SearchGraph.FUSED and not self.fused:
            logger.info("scale search on the lifted graph: the model is too large to emit per candidate")
        self._fused_jobs: dict[str, EmittedJob] = {}
        self._fused_search: Shared | None = None  # the search job, shared with the pool once
        self._cut_session = None if self.fused else state.scorer.session(with_outputs(lifted.model, cuts),
                                                                          "the search model")
        self._float: dict[str, list[dict[str, np.ndarray]]] = {}
        if self.local:  # the float model's block outputs, the local loss's reference
            float_cuts = state.scorer.session(with_outputs(state.model, cuts), "the float model")
            names = [o.name for o in float_cuts.get_outputs()]
            self._float = {kind: [dict(zip(names, float_cuts.run(None, feed), strict=True))
                                  for feed in feeds] for kind, feeds in self.feeds.items()}

    def _block_inputs(self, kind: str, tensor: str) -> list[np.ndarray]:
        scales = {self.lifted.inputs[g]: s for g, s in self.current.items()}
        names = [o.name for o in self._cut_session.get_outputs()]
        return [dict(zip(names, self._cut_session.run(None, {**feed, **scales}), strict=True))[tensor]
                for feed in self.feeds[kind]]

    def _suffix(self, block: Block) -> ir.Model:
        """The part of the search model a candidate of `block` runs."""
        end = block.output if self.local else None
        return suffix_model(self.lifted.model, block.input, end)

    def _job(self, block: Block, suffix: ir.Model, kind: str, workers: int) -> BlockJob:
        """What the workers need to score `block`'s candidates on the `kind` feeds."""
        config = self.state.config
        used = {v.name for v in suffix.graph.inputs}
        inputs = self._block_inputs(kind, block.input) if block.input is not None else None
        feeds = tuple({**{k: v for k, v in feed.items() if k in used},
                       **({BLOCK_INPUT: inputs[i]} if inputs is not None else {})}
                      for i, feed in enumerate(self.feeds[kind]))
        outputs = tuple(v.name for v in suffix.graph.outputs)
        if self.local and block.output is not None:
            reference = tuple((floats[block.output],) for floats in self._float[kind])
        else:
            reference = tuple(tuple(self.state.float_session.run(list(outputs), feed))
                              for feed in self.feeds[kind])
        scales = {self.lifted.inputs[g]: s for g, s in self.current.items() if self.lifted.inputs[g] in used}
        ceilings = {self.lifted.inputs[g]: c for g, c in self.ceilings.items()
                    if self.lifted.inputs.get(g) in used}
        threads = threads_per_worker(workers) if workers > 1 else 0
        return BlockJob(model_io.to_proto(suffix).SerializeToString(),
                        SessionSettings(threads=threads, provider=config.provider), feeds, reference,
                        outputs, config.evolq.loss, scales,
                        tuple(self.lifted.inputs[g] for g in block.groups), self.equal_feeds, ceilings)

    def _fused_job(self, kind: str, workers: int) -> EmittedJob:
        """What the workers need to emit and score candidates on the `kind` feeds (any block)."""
        if kind not in self._fused_jobs:
            state, config = self.state, self.state.config
            outputs = tuple(v.name for v in state.model.graph.outputs)
            reference = tuple(tuple(state.float_session.run(list(outputs), feed))
                              for feed in self.feeds[kind])
            threads = threads_per_worker(workers) if workers > 1 else 0
            self._fused_jobs[kind] = EmittedJob(self._emitter, SessionSettings(threads=threads,
                                                                         provider=config.provider),
                                                tuple(self.feeds[kind]), reference, outputs,
                                                config.evolq.loss, self.equal_feeds)
        return self._fused_jobs[kind]

    @functools.cached_property
    def _emitter(self) -> CandidateEmitter:
        """What emits a candidate: one for the search and selection jobs, so a process that
        scores both loads the prepared model once."""
        state = self.state
        return CandidateEmitter(model_io.to_proto(state.model).SerializeToString(), state.plan,
                                state.qparams, self.lifted.weights, emit_options(state.config))

    def _scales(self, block: Block, multipliers: np.ndarray) -> dict[str, np.ndarray]:
        """Every searched scale, `block`'s moved by e^multipliers (capped at their ceilings)."""
        return candidate_scales(self.current, block.groups, multipliers, self.ceilings)

    def _scorer(self, pool: WorkerPool, block: Block, suffix: ir.Model | None,
                steps: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """The search's score function: candidates (n, groups) of log-steps -> their losses."""
        workers = self.state.config.workers
        if self.fused:  # a candidate travels as its scales; the worker emits its model
            if self._fused_search is None:  # the same job for every block: shared once
                self._fused_search = pool.share(self._fused_job("search", workers))
            handle = self._fused_search
            return lambda candidates: np.array(pool.map(
                score_emitted, [(handle, self._scales(block, c * steps)) for c in candidates]))
        handle = pool.share(self._job(block, suffix, "search", workers))
        return lambda candidates: np.array(pool.map(score_candidate, [(handle, c * steps)
                                                                      for c in candidates]))

    def search(self, pool: WorkerPool, block: Block, evaluations: int,
               rng: np.random.Generator) -> BlockReport:
        start = time.perf_counter()
        settings = self.state.config.evolq
        suffix = None if self.fused else self._suffix(block)
        evolution = EvolutionSettings(settings.population, settings.elite, settings.tournament,
                                      settings.sigma, settings.final_sigma)
        search = evolve if settings.strategy is Strategy.EVOLUTION else random_search
        # the search draws steps of sigma; a weight's multiplier moves by weight_sigma instead
        steps = np.array([settings.weight_sigma / settings.sigma if group in self.lifted.weights else 1.0
                          for group in block.groups])
        result = search(self._scorer(pool, block, suffix, steps), len(block.groups), evaluations,
                        evolution, rng)
        result = dataclasses.replace(result, best=result.best * steps)
        decision = self._selection(block, suffix, result)
        kept = result.loss < result.start_loss and (decision is None or decision.kept)
        if kept:
            moved = self._scales(block, result.best)
            self.current.update(moved)
        logger.info("block of %d groups from %s: loss %.5g -> %.5g, selection %s", len(block.groups),
                    block.input, result.start_loss, result.loss, decision)
        scored = decision is not None
        return BlockReport(block.groups, block.input, result.evaluations, result.start_loss, result.loss,
                           decision.pooled_before if scored else None,
                           decision.pooled_after if scored else None, kept, time.perf_counter() - start,
                           decision.median_change if scored else None,
                           decision.improved_feeds if scored else None)

    def _selection(self, block: Block, suffix: ir.Model | None, result: SearchResult) -> KeepDecision | None:
        """The keep rule's verdict on the block's best candidate (None: nothing to judge)."""
        if not self.feeds["selection"] or result.loss >= result.start_loss:
            return None
        if self.fused:
            handle, score = Shared.inline(self._fused_job("selection", 1)), score_emitted_feeds
            candidate = functools.partial(self._scales, block)
        else:
            handle, score = Shared.inline(self._job(block, suffix, "selection", 1)), score_feeds
            candidate = np.asarray
        (pooled_before, before), (pooled_after, after) = (
            score((handle, candidate(m))) for m in (np.zeros(len(block.groups)), result.best))
        return decide(pooled_before, pooled_after, before, after)

