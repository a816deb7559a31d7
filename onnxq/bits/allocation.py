"""Mixed per-layer weight bits: from a budget and measured sensitivities to each layer's bits.

    free layers (no `layer_bits` rule)  --tied_layers-->  groups that share their bits
    each free layer x candidate bits    --WeightProbe (ORT)-->  damage table
    groups x candidates: damage, cost   --allocate.solve (MILP)-->  bits per group

Budgets (one of them; typed in onnxq.bits.budgets):

    avg_bits     sum(bits * elements) <= avg_bits * sum(elements), over all quantized weights
    max_size_mb  predicted bytes of the written file <= max_size_mb * 10^6
    max_size_ratio  the same, <= max_size_ratio * the float model's bytes
    max_bops     sum(MACs * weight bits * activation bits) <= max_bops * 10^9 (MACs on the
                 first calibration feed)
    max_drop     the smallest avg-bits budget whose model, emitted and run on the held-out
                 feeds, keeps 1 - (worst output cosine) <= max_drop; found by bisection over
                 the budget, each step re-solving the knapsack, so raising the bits of the
                 layers whose damage per bit is largest first

Layers fixed by a rule count against the budget with their fixed bits. The `random`
allocator replaces the measured damage by random numbers (same budget, same solver): the
baseline that shows whether the sensitivity signal is real.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.bits import sensitivity, sizes
from onnxq.bits.budgets import Budget, BudgetContext, LayerFacts, MaxDrop, MaxLatency, budget_from
from onnxq.bits.knapsack import Knapsack, SideLimit, solve
from onnxq.bits.latency_costs import LatencyTable
from onnxq.config import Allocator, QuantConfig
from onnxq.data import CalibrationSet
from onnxq.emit import EmitOptions
from onnxq.errors import ConfigError
from onnxq.index import ModelIndex
from onnxq.numerics import grouped_shape
from onnxq.plan import QuantPlan, WeightQuant

logger = logging.getLogger(__name__)

MAX_DROP_STEPS = 8


@dataclass(frozen=True)
class LayerAllocation:
    """What the allocator knew and chose for one layer."""

    layer: str
    op_type: str
    elements: int
    macs: int
    bits: int
    group: int
    rule: str | None
    damage: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AllocationReport:
    """The allocation: the budget, how much of it was used, and every layer's choice."""

    budget: str
    limit: float
    used: float
    measure: str
    allocator: str
    feeds: int
    layers: tuple[LayerAllocation, ...]
    seconds: float
    steps: tuple[tuple[float, float], ...] = ()  # max_drop: (average bits tried, drop measured)
    # max_latency: the chosen model's latency ratio to float, predicted from the per-layer table
    # and measured (onnxq.stages.allocate), one pair per solve.
    latency_steps: tuple[tuple[float, float], ...] = ()
    # The uniform check (`UniformCheck`): the knapsack's allocation against every free layer at
    # the most bits that fit, both measured as whole models; None when not made.
    uniform: UniformCheck | None = None

    @property
    def bits(self) -> dict[str, int]:
        return {layer.layer: layer.bits for layer in self.layers}

    @property
    def average_bits(self) -> float:
        """Mean weight bits, weighted by element counts."""
        elements = sum(layer.elements for layer in self.layers)
        return sum(layer.bits * layer.elements for layer in self.layers) / max(elements, 1)


@dataclass(frozen=True)
class UniformCheck:
    """The knapsack adds per-layer damages measured one layer at a time; layers' errors do not
    add up exactly (MiniLM-L6 at uniform W4's file size: a mix of 2, 4 and 8 bits kept 0.9819
    held-out cosine against uniform 4 bits' 0.9830). So when every free layer at one bit-width
    fits the budget, the knapsack's allocation and that uniform one (the most bits that fit)
    are emitted and their damage measured as whole models on calibration feeds the per-layer
    probes did not use; the uniform one is written when it is less damaging. Each is measured
    as it will be written: after sequential COMQ, when that runs (twice its time)."""

    bits: int
    feeds: int
    knapsack_damage: float
    uniform_damage: float
    knapsack_bits: dict[str, int] = field(default_factory=dict)  # what the knapsack chose

    @property
    def uniform_chosen(self) -> bool:
        return self.uniform_damage < self.knapsack_damage


# Called as values(layer, bits) -> (dequantized weight, corrected bias or None).
CandidateValues = Callable[[str, int], tuple[np.ndarray, np.ndarray | None]]
# Called with ({layer: bits}, feed indices): that model's damage on those calibration feeds and
# its written bytes.
WholeModelProbe = Callable[[dict[str, int], range], tuple[float, int]]
# Called with {layer: bits}: the worst output cosine of that model on held-out feeds.
FidelityProbe = Callable[[dict[str, int]], float]


@dataclass(frozen=True)
class ProbeBase:
    """The model the sensitivity probes start from: the float model (`float_session` None) or
    the 8-bit quantized one (with the float model's session for reference outputs), and each
    layer's (weight, bias) values in it."""

    model: ir.Model
    defaults: Callable[[str], tuple[np.ndarray, np.ndarray | None]]
    float_session: object | None = None


@dataclass(frozen=True)
class AllocationRequest:
    """What is allocated: the prepared model, its plan (rule-fixed layers keep their bits), the
    config (budget, candidates, measure), the calibration feeds, the emitter's layout, and the
    sizes a size budget is measured against: the float model's, and that of the model emitted
    with `plan` as it is (the budget is met by changing the layers' part of it, as
    `sizes.predict_layer_bytes` predicts it)."""

    index: ModelIndex
    plan: QuantPlan
    config: QuantConfig
    feeds: CalibrationSet
    layout: EmitOptions
    float_bytes: int
    quantized_bytes: int = 0
    latency: LatencyTable | None = None  # max_latency: each free layer's measured ms per bits
    damage: dict[str, dict[int, float]] | None = None  # measured already (a re-solve)


@dataclass(frozen=True)
class LayerProbes:
    """How candidates are measured: each layer's values at b bits, the probes' base model, and
    (for max_drop) the fidelity of a whole allocation."""

    values: CandidateValues
    base: ProbeBase
    fidelity_of: FidelityProbe | None = None
    # The uniform check's probe (`WholeModelProbe`); None skips the check.
    damage_of: WholeModelProbe | None = None


def allocate_bits(request: AllocationRequest, probes: LayerProbes,
                  progress: Callable[[int], None] | None = None) -> AllocationReport:
    """Bits for every weight layer of the request's plan under its config's budget."""
    start = time.perf_counter()
    index, plan, config = request.index, request.plan, request.config
    specs = {spec.node: spec for spec in plan.weights}
    # Layers a rule fixed, and dynamic ones (8-bit weights: MatMulInteger), keep their bits.
    free = [name for name in specs if name not in plan.bits_rules and name not in plan.dynamic_layers]
    candidates = tuple(sorted(set(config.candidate_bits)))
    probe_feeds = [request.feeds.feed(i) for i in range(min(len(request.feeds), config.sensitivity_feeds))]
    damage = request.damage or _damage_table(request, probes, free, candidates, probe_feeds, progress)
    macs = sensitivity.layer_macs(index.model, list(specs.values()), probe_feeds[0])
    latency = request.latency
    facts = {name: LayerFacts(sizes.layer_geometry(index, plan, spec), macs[name],
                              None if latency is None else latency.ms.get(name))
             for name, spec in specs.items()}
    groups = [g for g in sensitivity.tied_layers(index.model, plan) if g[0] in free]
    group_of = {name: number for number, group in enumerate(groups) for name in group}
    budget, side_budget = _budgets(config, latency)
    context = BudgetContext(sum(f.elements for f in facts.values()), request.float_bytes, request.layout,
                            latency)

    def cost_of(name: str, bits: int) -> float:
        return budget.cost(facts[name], bits, context)

    def table(value: Callable[[str, int], float]) -> np.ndarray:
        return np.array([[sum(value(n, b) for n in group) for b in candidates]
                         for group in groups]).reshape(len(groups), -1)

    side = () if side_budget is None else (SideLimit(
        side_budget.config_key, table(lambda n, b: side_budget.cost(facts[n], b, context)),
        side_budget.limit(context)),)
    problem = Knapsack(candidates, table(lambda n, b: damage[n][b]), table(cost_of), side)
    fixed = sum(cost_of(n, specs[n].grid.bits) for n in specs if n not in group_of)
    # Size budgets: the part of the file that no free layer owns (float tensors, scales).
    # (request.quantized_bytes was measured with the free layers at 8 bits)
    outside = (request.quantized_bytes - sum(cost_of(n, 8) for n in group_of) - fixed
               if budget.counts_file else 0)
    steps: list[tuple[float, float]] = []
    if isinstance(budget, MaxDrop):
        if probes.fidelity_of is None:
            raise ConfigError("max_drop needs held-out feeds to measure fidelity, and none are left")
        allocation, steps = _smallest_within_drop(problem, budget.drop, groups, probes.fidelity_of,
                                                  lambda c: (c + fixed) / context.weight_elements)
        limit = allocation.cost + fixed
    else:
        limit = budget.limit(context)
        allocation = solve(problem, limit - outside - fixed)
    uniform = None
    if not isinstance(budget, MaxDrop) and config.allocator is Allocator.SENSITIVITY and probes.damage_of:
        allocation, uniform = _against_uniform(
            problem, allocation, limit - outside - fixed, groups, probes.damage_of,
            _selection_feeds(request, len(probe_feeds)), limit if budget.counts_file else None,
            _uniform_choices(config, groups, specs, facts))
    chosen = {name: bits for group, bits in zip(groups, allocation.bits, strict=True) for name in group}
    layers = tuple(
        LayerAllocation(layer=name, op_type=index.node(name).op_type, elements=facts[name].elements,
                        macs=macs[name], bits=chosen.get(name, specs[name].grid.bits),
                        group=group_of.get(name, -1), rule=plan.bits_rules.get(name),
                        damage=damage.get(name, {}))
        for name in specs)
    report = AllocationReport(budget=budget.config_key, limit=float(limit),
                              used=float(allocation.cost + (fixed + outside)),
                              measure=config.sensitivity.value, allocator=config.allocator.value,
                              feeds=len(probe_feeds), layers=layers,
                              seconds=time.perf_counter() - start, steps=tuple(steps), uniform=uniform)
    logger.info("allocation (%s): %s", report.budget,
                dict(sorted(Counter(layer.bits for layer in report.layers).items())))
    return report


def _budgets(config: QuantConfig, latency: LatencyTable | None) -> tuple[Budget, Budget | None]:
    """The allocation's budget and its side limit: `max_latency` is the side limit of a size or
    bits budget, or the budget itself when it is the only one."""
    budget = budget_from(config)
    side = None if latency is None else MaxLatency(config.max_latency)
    return (side, None) if budget is None else (budget, side)


def _damage_table(request: AllocationRequest, probes: LayerProbes, free: list[str],
                  candidates: tuple[int, ...], probe_feeds: list,
                  progress: Callable[[int], None] | None) -> dict[str, dict[int, float]]:
    """{layer: {bits: damage}} for the free layers: measured through ORT, or random numbers
    for the random allocator (the baseline that shows whether the measured signal is real)."""
    config = request.config
    if config.allocator is Allocator.RANDOM:
        rng = np.random.default_rng(config.seed)
        return {name: {b: float(rng.random()) for b in candidates} for name in free}
    base = probes.base
    probe = sensitivity.WeightProbe(base.model, request.plan, {name: base.defaults(name) for name in free})
    return sensitivity.measure_sensitivity(probe, probe_feeds, dict.fromkeys(free, candidates),
                                           probes.values, config.sensitivity.value, progress,
                                           base.float_session)


def _smallest_within_drop(problem: Knapsack, max_drop: float, groups: list[list[str]],
                          fidelity_of: FidelityProbe, avg_bits: Callable[[float], float]):
    """Bisection over the budget: the cheapest knapsack solution whose measured drop is within
    `max_drop` (the dearest, all layers at the most bits, when none is)."""

    def bits_of(allocation) -> dict[str, int]:
        return {name: bits for group, bits in zip(groups, allocation.bits, strict=True) for name in group}

    low, high = problem.cheapest, problem.dearest
    best = solve(problem, high)
    steps = []
    drop = 1.0 - fidelity_of(bits_of(best))
    steps.append((avg_bits(high), drop))
    if drop > max_drop:
        logger.warning("max_drop %.4g not met even at the most bits (drop %.4g)", max_drop, drop)
        return best, steps
    for _ in range(MAX_DROP_STEPS):
        middle = (low + high) / 2
        candidate = solve(problem, middle)
        drop = 1.0 - fidelity_of(bits_of(candidate))
        steps.append((avg_bits(middle), drop))
        if drop <= max_drop:
            best, high = candidate, middle
        else:
            low = middle
    return best, steps


UNIFORM_CHECK_FEEDS = 16
UNIFORM_PREDICTION_SLACK = 0.01


def _selection_feeds(request: AllocationRequest, probed: int) -> range:
    """Calibration feeds after the probes' own: up to UNIFORM_CHECK_FEEDS (the probes' feeds
    when there are no others)."""
    available = len(request.feeds)
    if available <= probed:
        return range(probed)
    return range(probed, min(available, probed + UNIFORM_CHECK_FEEDS))


def _uniform_choices(config: QuantConfig, groups: list[list[str]], specs: dict[str, WeightQuant],
                     facts: dict[str, LayerFacts]) -> Callable[[int], list[tuple[int, ...]]]:
    """For a bit-width b, the uniform allocations the check tries, in order: the model
    `weight_bits = b` writes (the groups of short rows at `short_row_bits`, when any), then
    every group at b."""

    def short(name: str, bits: int) -> bool:
        spec, group = specs[name], config.group_size_at(bits)
        return (spec.block_axis is not None and bool(group) and bits < config.short_row_bits
                and grouped_shape(facts[name].geometry.weight_shape)[spec.block_axis] <= group)

    def choices(bits: int) -> list[tuple[int, ...]]:
        plain = (bits,) * len(groups)
        written = tuple(config.short_row_bits if all(short(name, bits) for name in group) else bits
                        for group in groups)
        return [written, plain] if written != plain else [plain]

    return choices


def _against_uniform(problem: Knapsack, allocation, capacity: float, groups: list[list[str]],
                     damage_of: WholeModelProbe, feeds: range, file_limit: float | None = None,
                     uniform_for: Callable[[int], list[tuple[int, ...]]] | None = None):
    """The knapsack's allocation, or a uniform one when that measures less damaging as a
    whole model (`UniformCheck`): at the most bits b that fit, each of `uniform_for(b)` in
    turn (default: every group at b; allocate_bits: the model `weight_bits = b` writes, short
    rows included, then every group at b). A size budget's prediction of the uniform
    model may miss by a little (framing that differs between layouts): within
    `UNIFORM_PREDICTION_SLACK` of the capacity it fits if its written bytes are within
    `file_limit`."""
    slack = UNIFORM_PREDICTION_SLACK if file_limit is not None else 1e-9
    uniform_for = uniform_for or (lambda bits: [(bits,) * len(groups)])
    near = [choice for bits in sorted(problem.candidates, reverse=True) for choice in uniform_for(bits)
            if all(b in problem.candidates for b in choice)
            and problem.evaluate(choice).cost <= capacity * (1 + slack)
            and problem.within_side_limits(choice)]

    def as_layers(choice) -> dict[str, int]:
        return {name: b for group, b in zip(groups, choice.bits, strict=True) for name in group}

    for choice in near:
        if allocation.bits == choice:
            return allocation, None
        uniform = problem.evaluate(choice)
        uniform_damage, written = damage_of(as_layers(uniform), feeds)
        if uniform.cost > capacity * (1 + 1e-9) and (file_limit is None or written > file_limit):
            continue
        bits = min(choice)
        check = UniformCheck(bits, len(feeds), damage_of(as_layers(allocation), feeds)[0], uniform_damage,
                             as_layers(allocation))
        logger.info("uniform check: knapsack %.4g, all %d-bit %.4g", check.knapsack_damage, bits,
                    check.uniform_damage)
        return (uniform if check.uniform_chosen else allocation), check
    return allocation, None
