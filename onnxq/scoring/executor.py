"""Where scoring work runs: an `Executor` maps a function over items and returns the results
in the items' order.

    InProcessExecutor().map(score, candidates) == [score(c) for c in candidates]

Today every score runs in this process, one after another. A process pool or a Ray executor
plugs in here later with the same `map`; its workers cannot be sent ORT sessions (they cannot
be pickled), so the function it maps must open its own session in the worker (from the model
bytes and `SessionSettings`, both picklable) and keep it for the items that worker scores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    """Maps a function over items; results in the items' order."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]: ...


class InProcessExecutor:
    """Every item in this process, in order (plain `list(map(fn, items))`)."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return list(map(fn, items))
