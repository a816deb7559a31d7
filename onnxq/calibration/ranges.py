"""Initial clipping ranges [lo, hi] of activation tensors from their streamed statistics.

Every method takes a `TensorStatistics`, the number of integer steps ``num_levels`` of the target
grid (``2**bits - 1``) and whether the grid is symmetric, and returns Python floats ``(lo, hi)``
with ``lo <= 0 <= hi`` (zero must be representable), and ``lo == -hi`` when symmetric. Turning
the range into a scale and zero point is the caller's job. Below, ``h`` is a histogram of x (or
of ``|x|``), ``N`` the number of finite values and ``a = max|x|``. Histogram methods never go
beyond the data: ``min <= lo`` and ``hi <= max`` before zero is added.

minmax
    ``[min(x), max(x)]``; symmetric ``[-a, a]``. Needs no histogram.

percentile (p, default 99.999)
    Asymmetric: ``lo`` = the (100 - p)-th and ``hi`` = the p-th percentile of x; symmetric:
    ``a`` = the p-th percentile of ``|x|``. Percentiles come from the cumulative histogram,
    interpolating linearly inside the bin where it crosses ``p/100 * N`` (error below one bin
    width where the data are dense; the ``|x|`` histogram is coarsened to ``num_bins``).

entropy (KL divergence, TensorRT's calibrator)
    For a candidate window of bins ``[s, e)``, the reference distribution ``P`` is ``h[s:e]``
    with the mass outside (the outliers) added to the end bin on its side; the candidate ``Q``
    merges ``h[s:e]`` (outliers excluded) into ``Q_bins`` groups (relative bin ``j`` of a
    window of ``W`` bins goes to group ``floor(j * Q_bins / W)``) and spreads each group's mass
    evenly over its non-empty bins. Both are normalised and the window minimising
    ``KL(P || Q) = sum P log(P / Q)`` is kept (the widest on ties); ``KL`` is infinite when an
    end bin is empty but has outliers beyond it. Windows are at least ``Q_bins`` bins and, as
    TensorRT's smallest threshold of 128 of 2048 bins, 1/16 of the histogram wide. Every window
    of a 1-D search is evaluated at once from cumulative sums, in O(Q_bins) each, on a
    histogram coarsened to <= 2048 bins.

    * symmetric: TensorRT's search on ``|x|``: windows ``[0, e)`` for every possible ``e``,
      ``Q_bins = (num_levels + 1) // 2`` (128 for 8 bits: the integer levels covering
      ``[0, a]``); range ``[-T, T]``. As in TensorRT, the first bin's count is replaced by the
      second's so that a spike of exact zeros (ReLU, padding) does not dominate.
    * asymmetric, data on one side of zero (ReLU, sigmoid): the same search on ``|x|`` with
      ``Q_bins = num_levels + 1`` (the whole grid covers that side); the other end is 0.
    * asymmetric, data on both sides: windows ``[s, e)`` of the histogram of x holding zero,
      ``Q_bins = num_levels + 1``; each side is searched on its own by coordinate descent
      (best ``e`` for the current ``s``, then best ``s`` for that ``e``, until neither moves),
      so a one-sided outlier is clipped without clipping the other side.

    When ``Q_bins`` reaches the number of bins (16-bit grids), KL only sees clipping, so the
    result is the minmax range.

mse
    Expected squared error of fake quantization, ``E[(x - x_hat)^2]`` times N, from the
    histogram with values uniform inside each bin. With step ``d = (hi - lo) / num_levels``
    and grid points ``k * d`` (zero representable), the pointwise error is
    ``(lo - x)^2`` below ``lo``, ``(x - hi)^2`` above ``hi`` and ``(x - d round(x / d))^2``
    inside, whose antiderivative is, exactly (no ``d^2 / 12`` approximation: a bin narrower
    than the step is charged its real rounding error on the grid),

        F(x) = d^3 R(c(x) / d) + ((max(x, hi) - hi)^3 - (lo - min(x, lo))^3) / 3,
        R(v) = floor(v + 1/2) / 12 + ((frac(v + 1/2) - 1/2)^3 + 1/8) / 3,

    ``c(x)`` being x clipped to ``[lo, hi]``; a bin ``[l, r)`` of count ``n`` contributes
    ``n (F(r) - F(l)) / (r - l)``. Candidates are ``num_candidates`` shrink factors ``f`` from
    1 down to ``min_shrink``: symmetric ``f * [-a, a]``; asymmetric ``[f_lo * min, f_hi * max]``
    with the two factors searched by coordinate descent as for entropy. The smallest error
    wins (the widest range on ties). A symmetric grid is modelled as ``k * 2a / num_levels``
    too. Exact zeros (ReLU) are spread over their bin ``[0, w)`` like any value, costing up to
    ``w^2 / 3`` each where the real grid costs nothing; that is the same for every candidate
    while ``w`` is well below the step, so it barely moves the choice.

Degenerate statistics: with no finite values the range is ``(0.0, 0.0)``; when all values equal
one ``v`` it is ``(min(v, 0), max(v, 0))`` (symmetric ``(-|v|, |v|)``), so ``(0.0, 0.0)`` for an
all-zero tensor. The caller treats a zero-width range specially.
"""

from __future__ import annotations

import numpy as np

from onnxq.calibration.statistics import TensorStatistics

#: The methods `compute_range` knows.
METHODS = ("minmax", "percentile", "entropy", "mse")

_MAX_ROUNDS = 8  # coordinate-descent rounds of the two-sided searches (2 or 3 in practice)


def compute_range(
    method: str,
    stats: TensorStatistics,
    *,
    num_levels: int,
    symmetric: bool,
    percentile: float = 99.999,
) -> tuple[float, float]:
    """The clipping range of one tensor by ``method`` (one of `METHODS`)."""
    if method == "minmax":
        return minmax_range(stats, num_levels=num_levels, symmetric=symmetric)
    if method == "percentile":
        return percentile_range(stats, num_levels=num_levels, symmetric=symmetric, percentile=percentile)
    if method == "entropy":
        return entropy_range(stats, num_levels=num_levels, symmetric=symmetric)
    if method == "mse":
        return mse_range(stats, num_levels=num_levels, symmetric=symmetric)
    raise ValueError(f"unknown range method {method!r}; expected one of {', '.join(METHODS)}")


def minmax_range(stats: TensorStatistics, *, num_levels: int, symmetric: bool) -> tuple[float, float]:
    """``[min, max]`` of the data, widened to hold 0 (symmetric: ``[-max|x|, max|x|]``)."""
    _check_levels(num_levels)
    if stats.count == 0:
        return 0.0, 0.0
    return _finish(stats.min, stats.max, symmetric)


def percentile_range(
    stats: TensorStatistics, *, num_levels: int, symmetric: bool, percentile: float = 99.999
) -> tuple[float, float]:
    """Clip both tails at ``percentile`` (symmetric: the ``percentile`` of ``|x|``)."""
    _check_levels(num_levels)
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    _require_histogram(stats, "percentile")
    if _is_degenerate(stats):
        return minmax_range(stats, num_levels=num_levels, symmetric=symmetric)
    q = percentile / 100.0
    if symmetric:
        edges, counts = stats.abs_histogram(max_bins=stats.num_bins)
        a = min(_quantile(edges, counts, q), _abs_max(stats))
        return _finish(-a, a, symmetric)
    edges, counts = stats.histogram()
    lo = max(_quantile(edges, counts, 1.0 - q), stats.min)
    hi = min(_quantile(edges, counts, q), stats.max)
    return _finish(lo, hi, symmetric)


def entropy_range(
    stats: TensorStatistics, *, num_levels: int, symmetric: bool, max_bins: int = 2048
) -> tuple[float, float]:
    """Threshold(s) minimising the KL divergence of the clipped, quantized distribution."""
    _check_levels(num_levels)
    _require_histogram(stats, "entropy")
    if _is_degenerate(stats):
        return minmax_range(stats, num_levels=num_levels, symmetric=symmetric)
    if symmetric or stats.min >= 0.0 or stats.max <= 0.0:
        edges, counts = stats.abs_histogram(max_bins=max_bins)
        hist = counts.astype(np.float64)
        if hist.size > 1:
            hist[0] = hist[1]  # TensorRT: a spike of exact zeros must not dominate
        quant_bins = min((num_levels + 1) // 2 if symmetric else num_levels + 1, hist.size)
        ends = np.arange(max(quant_bins, hist.size // 16), hist.size + 1)
        kl = _window_kl(hist, np.zeros_like(ends), ends, quant_bins)
        t = min(float(edges[ends[_last_argmin(kl)]]), _abs_max(stats))
        if symmetric:
            return _finish(-t, t, symmetric)
        return _finish(0.0, t, symmetric) if stats.min >= 0.0 else _finish(-t, 0.0, symmetric)
    edges, counts = stats.histogram(include_zero=True, max_bins=max_bins)
    hist = counts.astype(np.float64)
    zero = int(np.searchsorted(edges, 0.0))  # zero is a bin edge: edges[zero] == 0
    quant_bins = min(num_levels + 1, hist.size)
    min_width = max(quant_bins, hist.size // 16)
    start, end = _two_sided_kl_window(hist, zero, quant_bins, min_width)
    lo = max(float(edges[start]), stats.min)
    hi = min(float(edges[end]), stats.max)
    return _finish(lo, hi, symmetric)


def mse_range(
    stats: TensorStatistics,
    *,
    num_levels: int,
    symmetric: bool,
    num_candidates: int = 100,
    min_shrink: float = 0.05,
    max_bins: int = 2048,
) -> tuple[float, float]:
    """The shrink of the minmax range with the smallest expected squared quantization error."""
    _check_levels(num_levels)
    if num_candidates < 1 or not 0.0 < min_shrink <= 1.0:
        raise ValueError(
            f"need num_candidates >= 1 and 0 < min_shrink <= 1, got {num_candidates} and {min_shrink}"
        )
    _require_histogram(stats, "mse")
    lo, hi = minmax_range(stats, num_levels=num_levels, symmetric=symmetric)
    if _is_degenerate(stats):
        return lo, hi
    factors = np.linspace(1.0, min_shrink, num_candidates)
    edges, counts = stats.histogram(include_zero=True, max_bins=max_bins)
    if symmetric:
        errors = _expected_sq_error(edges, counts, -factors * hi, factors * hi, num_levels)
        a = hi * float(factors[np.argmin(errors)])
        return _finish(-a, a, symmetric)
    lo_candidates, hi_candidates = factors * lo, factors * hi
    for _ in range(_MAX_ROUNDS):
        previous = (lo, hi)
        errors = _expected_sq_error(edges, counts, np.full_like(factors, lo), hi_candidates, num_levels)
        hi = float(hi_candidates[np.argmin(errors)])
        errors = _expected_sq_error(edges, counts, lo_candidates, np.full_like(factors, hi), num_levels)
        lo = float(lo_candidates[np.argmin(errors)])
        if (lo, hi) == previous:
            break
    return _finish(lo, hi, symmetric)


# --------------------------------------------------------------------------------- helpers


def _check_levels(num_levels: int) -> None:
    if num_levels < 1:
        raise ValueError(f"num_levels must be at least 1, got {num_levels}")


def _require_histogram(stats: TensorStatistics, method: str) -> None:
    if not stats.keep_histogram:
        raise ValueError(
            f"the {method} range needs a histogram: collect the statistics with "
            "TensorStatistics(keep_histogram=True)"
        )


def _is_degenerate(stats: TensorStatistics) -> bool:
    """No finite values, or all equal: every method then returns the minmax range."""
    return stats.count == 0 or stats.min == stats.max


def _abs_max(stats: TensorStatistics) -> float:
    return max(abs(stats.min), abs(stats.max))


def _finish(lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
    """Widen to hold zero (and to ``[-a, a]`` when symmetric); plain floats."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        a = max(-lo, hi)
        return -a, a
    return lo, hi


def _quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The q-quantile of a histogram, interpolating linearly inside the crossing bin."""
    cumulative = np.cumsum(counts)
    rank = q * float(cumulative[-1])
    if rank <= 0.0:
        return float(edges[int(np.flatnonzero(counts)[0])])
    k = min(int(np.searchsorted(cumulative, rank, side="left")), counts.size - 1)
    before = float(cumulative[k - 1]) if k > 0 else 0.0
    fraction = (rank - before) / float(counts[k])
    return float(edges[k] + fraction * (edges[k + 1] - edges[k]))


def _last_argmin(values: np.ndarray) -> int:
    return int(values.size - 1 - np.argmin(values[::-1]))


def _two_sided_kl_window(hist: np.ndarray, zero: int, quant_bins: int, min_width: int) -> tuple[int, int]:
    """Window ``[s, e)`` holding bin edge ``zero``, each end searched in turn (widest on ties)."""
    n = hist.size
    start, end = 0, n
    for _ in range(_MAX_ROUNDS):
        previous = (start, end)
        ends = np.arange(max(zero, start + min_width), n + 1)
        end = int(ends[_last_argmin(_window_kl(hist, np.full_like(ends, start), ends, quant_bins))])
        starts = np.arange(0, min(zero, end - min_width) + 1)
        kl = _window_kl(hist, starts, np.full_like(starts, end), quant_bins)
        start = int(starts[np.argmin(kl)])
        if (start, end) == previous:
            break
    return start, end


def _window_kl(hist: np.ndarray, starts: np.ndarray, ends: np.ndarray, quant_bins: int) -> np.ndarray:
    """KL(P || Q) of every window ``[starts[k], ends[k])``, each at least quant_bins wide.

    With ``S_g``, ``C_g`` and ``L_g`` the mass, non-empty bin count and ``sum h log h`` of
    group g, ``M`` the mass inside the window and ``N`` the total, a bin j of group g
    contributes ``h_j / N * (log h_j + r_g)`` with ``r_g = log(C_g M / (S_g N))``, which sums
    to ``(L_g + S_g r_g) / N`` per group; the two end bins, which also carry the outliers,
    are then corrected.
    """
    total = float(hist.sum())
    nonzero = hist > 0
    log_h = np.log(np.where(nonzero, hist, 1.0))
    cum_mass = np.concatenate(([0.0], np.cumsum(hist)))
    cum_nonzero = np.concatenate(([0], np.cumsum(nonzero)))
    cum_hlogh = np.concatenate(([0.0], np.cumsum(hist * log_h)))

    widths = ends - starts
    groups = np.arange(quant_bins + 1)
    bounds = starts[:, None] + (groups[None, :] * widths[:, None] + quant_bins - 1) // quant_bins
    mass = np.diff(cum_mass[bounds], axis=1)
    filled = np.diff(cum_nonzero[bounds], axis=1)
    hlogh = np.diff(cum_hlogh[bounds], axis=1)
    inside = cum_mass[ends] - cum_mass[starts]

    used = mass > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(
            used,
            np.log(np.where(used, filled, 1))
            + np.log(inside)[:, None]
            - np.log(np.where(used, mass, 1.0))
            - np.log(total),
            0.0,
        )
    kl = np.where(used, hlogh + mass * ratio, 0.0).sum(axis=1)
    outliers = (cum_mass[starts], total - cum_mass[ends])
    for end_bin, group, extra in ((starts, 0, outliers[0]), (ends - 1, -1, outliers[1])):
        h = hist[end_bin]
        r = ratio[:, group]
        with np.errstate(divide="ignore", invalid="ignore"):
            fix = (h + extra) * (np.log(h + extra) + r) - h * (log_h[end_bin] + r)
        fix = np.where(h > 0, fix, np.inf)
        kl = kl + np.where(extra > 0, fix, 0.0)
    return kl / total


def _expected_sq_error(
    edges: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, num_levels: int
) -> np.ndarray:
    """``sum n (F(r) - F(l)) / (r - l)`` over bins (module docstring), per ``[lo[k], hi[k]]``."""
    density = counts / np.diff(edges)
    x, lo, hi = edges[None, :], lo[:, None], hi[:, None]
    step = (hi - lo) / num_levels
    v = np.clip(x, lo, hi) / step + 0.5
    whole = np.floor(v)
    v -= whole + 0.5
    antiderivative = step * step * step * (whole / 12.0 + (v * v * v + 0.125) / 3.0)
    above = np.maximum(x, hi) - hi
    below = lo - np.minimum(x, lo)
    antiderivative += (above * above * above - below * below * below) / 3.0
    return np.diff(antiderivative, axis=1) @ density
