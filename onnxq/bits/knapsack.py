"""Choose per-layer weight bits under a budget: an exact multiple-choice knapsack (pure numeric).

Each *group* of layers (one layer, or layers tied to share their bits) picks exactly one
candidate bit-width b. Picking b costs `cost[g, b]` of the budget (bits x elements, bytes on
disk, or bit operations) and adds `damage[g, b]` (the measured sensitivity of quantizing the
group at b bits, assumed additive over groups, as in HAWQ-V3). The allocation minimizes total
damage subject to total cost <= budget:

    minimize   sum_g sum_b damage[g, b] x[g, b]
    subject to sum_b x[g, b] = 1 for every g,   sum_g sum_b cost[g, b] x[g, b] <= budget,
               x binary

solved exactly by `scipy.optimize.milp` (HiGHS branch and bound). A problem may carry side
limits, each a cost table of the same shape and a limit (the measured latency under
`max_latency`, next to a size budget): more rows of the same kind. `brute_force` enumerates the
same problem for small cases (the tests check that both agree).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from onnxq.errors import ConfigError


@dataclass(frozen=True)
class Allocation:
    """Chosen bits per group, with the total damage and cost of the choice."""

    bits: tuple[int, ...]
    damage: float
    cost: float


@dataclass(frozen=True)
class SideLimit:
    """A second budget of the same problem: `cost` (groups, candidates), total <= `limit`."""

    name: str
    cost: np.ndarray
    limit: float


@dataclass(frozen=True)
class Knapsack:
    """The problem: `damage` and `cost` are (groups, len(candidates)) arrays."""

    candidates: tuple[int, ...]
    damage: np.ndarray
    cost: np.ndarray
    side: tuple[SideLimit, ...] = ()

    def __post_init__(self) -> None:
        shape = (self.damage.shape[0], len(self.candidates))
        if self.damage.shape != shape or self.cost.shape != shape:
            raise ValueError(f"damage {self.damage.shape} and cost {self.cost.shape} must be {shape}")
        for limit in self.side:
            if limit.cost.shape != shape:
                raise ValueError(f"{limit.name} cost {limit.cost.shape} must be {shape}")

    def within_side_limits(self, bits: tuple[int, ...]) -> bool:
        columns = [self.candidates.index(b) for b in bits]
        rows = np.arange(len(bits))
        return all(limit.cost[rows, columns].sum() <= limit.limit * (1 + 1e-12) for limit in self.side)

    def evaluate(self, bits: tuple[int, ...]) -> Allocation:
        columns = [self.candidates.index(b) for b in bits]
        rows = np.arange(len(bits))
        return Allocation(tuple(bits), float(self.damage[rows, columns].sum()),
                          float(self.cost[rows, columns].sum()))

    @property
    def cheapest(self) -> float:
        return float(self.cost.min(axis=1).sum())

    @property
    def dearest(self) -> float:
        return float(self.cost.max(axis=1).sum())


def solve(problem: Knapsack, budget: float) -> Allocation:
    """The least-damage allocation whose cost is within `budget` (exact)."""
    groups, choices = problem.damage.shape
    if groups == 0:
        return Allocation((), 0.0, 0.0)
    if budget < problem.cheapest * (1 - 1e-12):
        raise ConfigError(f"the budget cannot be met: even the fewest bits everywhere cost "
                          f"{problem.cheapest:.6g}, over the budget of {budget:.6g}")
    one_choice = np.kron(np.eye(groups), np.ones(choices))
    constraints = [LinearConstraint(one_choice, 1, 1),
                   LinearConstraint(problem.cost.reshape(1, -1), -np.inf, budget)]
    constraints += [LinearConstraint(limit.cost.reshape(1, -1), -np.inf, limit.limit)
                    for limit in problem.side]
    # Damage relative to each group's best option keeps the objective well scaled.
    damage = problem.damage - problem.damage.min(axis=1, keepdims=True)
    result = milp(damage.reshape(-1), constraints=constraints, integrality=np.ones(groups * choices),
                  bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if result.x is None:
        sides = "".join(f" and {limit.name} {limit.limit:.6g}" for limit in problem.side)
        raise ConfigError(f"no allocation fits the budget of {budget:.6g}{sides} ({result.message})")
    chosen = np.asarray(result.x).reshape(groups, choices).argmax(axis=1)
    return problem.evaluate(tuple(problem.candidates[c] for c in chosen))


def brute_force(problem: Knapsack, budget: float) -> Allocation | None:
    """Every combination tried (small problems only): the reference `solve` is tested against."""
    best = None
    for bits in itertools.product(problem.candidates, repeat=problem.damage.shape[0]):
        candidate = problem.evaluate(bits)
        fits = candidate.cost <= budget and problem.within_side_limits(bits)
        if fits and (best is None or candidate.damage < best.damage - 1e-12):
            best = candidate
    return best
