"""Budgets of the bit allocation, one type each: what a layer at b bits costs, and the limit.

    AverageBits(bits)      cost = stored b * elements  limit = bits * all weight elements
                           (stored b: the container's bits, 3-bit codes count 4 in int4)
    SizeMB(megabytes)      cost = bytes on disk         limit = megabytes * 10^6
    SizeRatio(ratio)       cost = bytes on disk         limit = ratio * the float file's bytes
    Bops(gbops)            cost = MACs * b * 8          limit = gbops * 10^9
    MaxDrop(drop)          cost = stored b * elements  limit: found by measuring fidelity
                           (bisection over the average-bits limit; see onnxq.bits.allocation)

Size budgets also count what no layer's bits change (activation scales, float tensors, the
layers fixed by rules): `outside_cost` is the part of the file the layers being allocated do
not own. A new budget is one frozen dataclass here with `cost`, `limit` and a `config_key`
(its field in `QuantConfig`), added to `BUDGET_TYPES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from onnxq.bits.latency_costs import LatencyTable
from onnxq.bits.sizes import LayerGeometry, framing_bytes, predict_layer_bytes, stored_bits
from onnxq.errors import ConfigError
from onnxq.passes.insert_qdq import EmitOptions

ACTIVATION_BITS = 8


@dataclass(frozen=True)
class LayerFacts:
    """What a layer's cost depends on: its geometry (size on disk), MACs on one feed."""

    geometry: LayerGeometry
    macs: int
    latency_ms: Mapping[int, float] | None = None  # measured, for max_latency

    @property
    def elements(self) -> int:
        return self.geometry.elements


@dataclass(frozen=True)
class BudgetContext:
    """Totals a limit is measured against."""

    weight_elements: int
    float_bytes: int
    layout: EmitOptions
    latency: LatencyTable | None = None


def _positive(budget: object, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{budget.config_key} must be > 0, got {value}")


@dataclass(frozen=True)
class AverageBits:
    bits: float
    config_key: ClassVar[str] = "avg_bits"
    counts_file: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _positive(self, self.bits)

    def cost(self, layer: LayerFacts, bits: int, context: BudgetContext) -> float:
        """Bits as stored: a 3-bit layer costs what a 4-bit one does (the same int4 bytes), so
        `avg_bits = 4` writes no larger a file than every layer at 4 bits."""
        return stored_bits(layer.geometry, bits, context.layout) * layer.elements

    def limit(self, context: BudgetContext) -> float:
        return self.bits * context.weight_elements


@dataclass(frozen=True)
class SizeMB:
    megabytes: float
    config_key: ClassVar[str] = "max_size_mb"
    counts_file: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _positive(self, self.megabytes)

    def cost(self, layer: LayerFacts, bits: int, context: BudgetContext) -> float:
        return (predict_layer_bytes(layer.geometry, bits, context.layout)
                + framing_bytes(layer.geometry, bits, context.layout))

    def limit(self, context: BudgetContext) -> float:
        return self.megabytes * 1e6


@dataclass(frozen=True)
class SizeRatio:
    ratio: float
    config_key: ClassVar[str] = "max_size_ratio"
    counts_file: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _positive(self, self.ratio)

    def cost(self, layer: LayerFacts, bits: int, context: BudgetContext) -> float:
        return (predict_layer_bytes(layer.geometry, bits, context.layout)
                + framing_bytes(layer.geometry, bits, context.layout))

    def limit(self, context: BudgetContext) -> float:
        return self.ratio * context.float_bytes


@dataclass(frozen=True)
class Bops:
    gbops: float
    config_key: ClassVar[str] = "max_bops"
    counts_file: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _positive(self, self.gbops)

    def cost(self, layer: LayerFacts, bits: int, context: BudgetContext) -> float:
        return layer.macs * bits * ACTIVATION_BITS

    def limit(self, context: BudgetContext) -> float:
        return self.gbops * 1e9


@dataclass(frozen=True)
class MaxDrop:
    """No cost limit of its own: the cheapest average-bits allocation whose measured drop
    (1 - worst held-out output cosine) stays within `drop`."""

    drop: float
    config_key: ClassVar[str] = "max_drop"
    counts_file: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _positive(self, self.drop)

    def cost(self, layer: LayerFacts, bits: int, context: BudgetContext) -> float:
        return stored_bits(layer.geometry, bits, context.layout) * layer.elements

    def limit(self, context: BudgetContext) -> float:
        raise ConfigError("max_drop has no fixed limit: it is searched by measuring fidelity")


@dataclass(frozen=True)
class MaxLatency:
    """The written model within `ratio` of the float model's latency, as measured per layer
    (free layers only: the rest is in the table's anchor)."""

    ratio: float
    config_key: ClassVar[str] = "max_latency"
    counts_file: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _positive(self, self.ratio)

    def cost(self, layer: LayerFacts, bits: int, context: BudgetContext) -> float:
        return 0.0 if layer.latency_ms is None else layer.latency_ms[bits]

    def limit(self, context: BudgetContext) -> float:
        if context.latency is None:
            raise ConfigError("max_latency needs the measured latency table")
        return context.latency.layer_limit_ms(self.ratio)


Budget = AverageBits | SizeMB | SizeRatio | Bops | MaxDrop | MaxLatency
BUDGET_TYPES: tuple[type, ...] = (AverageBits, SizeMB, SizeRatio, Bops, MaxDrop)
BUDGET_KEYS: tuple[str, ...] = tuple(t.config_key for t in BUDGET_TYPES)


def budget_from(config: object) -> Budget | None:
    """The typed budget of a config's allocation fields (`avg_bits`, `max_size_mb`, ...); None
    when none is set. `QuantConfig` has checked that at most one is."""
    for budget_type in BUDGET_TYPES:
        value = getattr(config, budget_type.config_key)
        if value is not None:
            return budget_type(value)
    return None
