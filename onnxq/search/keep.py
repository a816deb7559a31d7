"""When a block's searched scales are kept: a paired, per-feed test on the selection feeds.

The search loss pools the feeds (MSE: the summed error energy over the summed signal energy),
so a few feeds with large errors can carry it. At 4-bit weights that happens: on PP-OCRv4 W4A8
a block that helped a few outlier feeds lowered the pooled selection loss while it hurt most
feeds, and the held-out calibration cosine fell 0.986 -> 0.960. So the pooled loss alone does
not decide. With l_i and l'_i the loss of selection feed i alone before and after the block's
best candidate (the incumbent and the candidate scored on the same feeds: paired),

    change_i = l'_i / l_i - 1                  (relative, so that every feed counts equally)
    kept  <=>  pooled loss after < pooled loss before
               and  #{i : change_i < 0} > n / 2    (a strict majority of the n feeds got better)

(For an odd n the second condition is median_i change_i < 0; the median is reported too.)

A feed the incumbent already fits exactly (l_i = 0) counts as unchanged when it stays exact and
as worse otherwise. Pure numpy; the caller scores the feeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KeepDecision:
    """The verdict on one block's candidate and the numbers it rests on."""

    kept: bool
    pooled_before: float
    pooled_after: float
    median_change: float  # median over feeds of the relative change of each feed's loss
    improved_feeds: int
    feeds: int

    @property
    def reason(self) -> str:
        if self.kept:
            return "kept"
        if not self.pooled_after < self.pooled_before:
            return "pooled selection loss not lower"
        return f"most selection feeds worse ({self.improved_feeds} of {self.feeds} better)"


def relative_changes(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per feed, loss after / loss before - 1 (0 for a feed exact before and after; +inf for one
    exact before only)."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    exact = before <= 0
    safe = np.where(exact, 1.0, before)
    return np.where(exact, np.where(after <= 0, 0.0, np.inf), after / safe - 1.0)


def decide(pooled_before: float, pooled_after: float, before: np.ndarray, after: np.ndarray) -> KeepDecision:
    """Keep a candidate only if it lowers the pooled loss and the loss of most feeds."""
    changes = relative_changes(before, after)
    median = float(np.median(changes)) if len(changes) else 0.0
    improved = int(np.sum(changes < 0))
    kept = pooled_after < pooled_before and (len(changes) == 0 or 2 * improved > len(changes))
    return KeepDecision(bool(kept), float(pooled_before), float(pooled_after), median, improved, len(changes))
