"""Evolutionary search of one block's scales (pure numpy; Evol-Q, Frumkin et al., ICCV 2023).

A candidate is a vector m of log-multipliers, one per scale of the block: scale_i = s_i e^{m_i}.
The loss of a quantized network is jagged in its scales (small moves flip roundings), so the
search needs no gradient, only scores:

    population: the incumbent (m = 0) and P - 1 perturbations m = sigma_0 N(0, I)
    per generation g (step sigma_g shrinking geometrically from sigma_0 to sigma_final):
        elites:   the E best candidates, kept as they are
        children: P - E, each from two parents drawn by tournament (best of T drawn at random),
                  uniform crossover, and a Gaussian step sigma_g on a random half of the
                  coordinates (at least one)
    result: the best candidate ever scored

`random_search` spends the same evaluations on independent perturbations around the incumbent:
the baseline that shows what selection adds. Both score a whole generation with one call, so
the caller can spread it over workers; both are deterministic for a given `rng`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Called with candidates (n, d): their losses (n,).
ScoreBatch = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EvolutionSettings:
    population: int = 8
    elite: int = 2
    tournament: int = 3
    sigma: float = 0.05
    final_sigma: float = 0.05  # equal to sigma: a constant step


@dataclass(frozen=True)
class SearchResult:
    """The best candidate, its loss, the incumbent's loss, and the best loss after each scoring."""

    best: np.ndarray
    loss: float
    start_loss: float
    evaluations: int
    history: tuple[float, ...]


def generations_for(evaluations: int, settings: EvolutionSettings) -> int:
    """Generations that fit in `evaluations` (the first population included)."""
    return max(0, (evaluations - settings.population) // max(settings.population - settings.elite, 1))


def evolve(score: ScoreBatch, dimension: int, evaluations: int, settings: EvolutionSettings,
           rng: np.random.Generator) -> SearchResult:
    """Evolutionary search from the incumbent (all zeros) within `evaluations` scorings."""
    population = np.vstack([np.zeros(dimension),
                            settings.sigma * rng.standard_normal((settings.population - 1, dimension))])
    losses = np.asarray(score(population), np.float64)
    start_loss, count = float(losses[0]), len(population)
    history = [float(losses.min())]
    generations = generations_for(evaluations, settings)
    for generation in range(generations):
        fraction = (generation + 1) / generations
        sigma = settings.sigma * (settings.final_sigma / settings.sigma) ** fraction
        order = np.argsort(losses, kind="stable")
        elites, elite_losses = population[order[:settings.elite]], losses[order[:settings.elite]]
        children = np.array([_child(population, losses, sigma, settings, rng)
                             for _ in range(settings.population - settings.elite)])
        child_losses = np.asarray(score(children), np.float64)
        count += len(children)
        population = np.vstack([elites, children])
        losses = np.concatenate([elite_losses, child_losses])
        history.append(float(losses.min()))
    best = int(np.argmin(losses))
    return SearchResult(population[best].copy(), float(losses[best]), start_loss, count, tuple(history))


def _child(population: np.ndarray, losses: np.ndarray, sigma: float, settings: EvolutionSettings,
           rng: np.random.Generator) -> np.ndarray:
    first, second = (population[_tournament(losses, settings.tournament, rng)] for _ in range(2))
    child = np.where(rng.random(population.shape[1]) < 0.5, first, second)
    mutated = rng.random(population.shape[1]) < 0.5
    mutated[rng.integers(population.shape[1])] = True
    return child + mutated * sigma * rng.standard_normal(population.shape[1])


def _tournament(losses: np.ndarray, size: int, rng: np.random.Generator) -> int:
    drawn = rng.choice(len(losses), size=min(size, len(losses)), replace=False)
    return int(drawn[np.argmin(losses[drawn])])


def random_search(score: ScoreBatch, dimension: int, evaluations: int, settings: EvolutionSettings,
                  rng: np.random.Generator) -> SearchResult:
    """The incumbent and `evaluations - 1` independent perturbations of step sigma, scored in
    batches of one population."""
    candidates = np.vstack([np.zeros(dimension),
                            settings.sigma * rng.standard_normal((evaluations - 1, dimension))])
    batches = np.array_split(candidates, max(1, evaluations // settings.population))
    losses = np.concatenate([np.asarray(score(batch), np.float64) for batch in batches])
    history = tuple(float(v) for v in np.minimum.accumulate(losses))
    best = int(np.argmin(losses))
    return SearchResult(candidates[best].copy(), float(losses[best]), float(losses[0]), len(candidates),
                        history)
