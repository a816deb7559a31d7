"""Streamed, shape-agnostic statistics of one activation tensor, kept in constant memory.

Calibration runs the model over many feeds and, for every activation tensor to quantize, hands
each feed's values to one `TensorStatistics`. The object never keeps the values: it keeps the
running min and max, counts, and a fixed-size histogram, so 1,000 feeds of a 10M-float tensor
cost the same memory as one, and feeds whose shapes differ (text models with varying sequence
lengths) mix freely: only the values matter, never the shape. The range methods of
`onnxq.calibration.ranges` (minmax, percentile, entropy, mse) read these statistics afterwards.

Non-finite values (NaN, +-inf, e.g. an attention mask built with -inf) are counted in
`nonfinite_count` and left out of everything else. Large finite mask constants such as -3.4e38
are ordinary values: they set `min`, and the histogram grows to hold them (coarsely).

Histogram scheme: power-of-two bins on a grid anchored at zero
-------------------------------------------------------------
Bin ``i`` covers ``[i * w, (i + 1) * w)`` where the width ``w = 2**e`` is a power of two, and
the histogram keeps the counts of ``num_bins`` consecutive bins (a window), placed around the
data. Because ``x * 2**-e`` is exact in floating point, a value's bin is exactly
``floor(x / w)``; zero is always a bin edge.

* The first feed whose values are not all equal fixes the smallest power of two for which
  ``[min, max]`` fits in the window (so the data fill between half and all of the bins), but
  never finer than ``max|x| * 2**-21``, which keeps every bin index below ``2**22``: exact in
  float32 arithmetic. Until then (all values so far equal, e.g. all-zero feeds) no width is
  fixed: the values are all ``min`` and their number is ``count``.
* When later data fall outside the window, ``w`` is doubled as many times as needed: new bin
  ``j`` is the sum of old bins ``2j`` and ``2j + 1`` (or of ``2**k`` old bins after ``k``
  doublings), which is exact: every count stays the count of values in its bin. The window is
  then re-centred on ``[min, max]``.
* Two statistics of one tensor merge exactly (`merge`): the finer histogram is coarsened to the
  other's power of two, and bins line up because both grids are anchored at zero.

Since ``[min, max]`` always spans more than half of the window (after the first width is fixed
and after every doubling), the data see at least ``num_bins / 2`` bins. The default of 4096
bins therefore gives at least 2048 bins over ``[min, max]`` (the 2048 of ONNX Runtime's and
TensorRT's histogram calibrators), at least 1024 over ``|x|`` for data symmetric about zero,
and at least 2048 over all-positive data such as ReLU outputs, where a histogram on ``[-R, R]``
would waste half of its bins. It costs 32 KiB per tensor. Accessors can coarsen the histogram
exactly to at most ``max_bins`` bins for the range searches.

The hot path, `update`, costs one min and one max pass over the data plus a chunked
multiply / floor / subtract / cast / `np.bincount` pass whose temporaries are bounded by the
chunk size, not by the tensor size.
"""

from __future__ import annotations

import math

import numpy as np


class TensorStatistics:
    """Running statistics of one tensor's values over many calibration feeds.

    Attributes:
        min: smallest finite value seen (``+inf`` while ``count == 0``).
        max: largest finite value seen (``-inf`` while ``count == 0``).
        count: number of finite values seen.
        nonfinite_count: number of NaN and +-inf values seen (left out of all the others).
        keep_histogram: whether a histogram is kept (the minmax method needs none).
        num_bins: number of bins in the histogram window.
    """

    _CHUNK = 1 << 16  # values binned per step: bounds the temporaries of `update`

    def __init__(self, *, keep_histogram: bool = True, num_bins: int = 4096) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins}")
        self.keep_histogram = keep_histogram
        self.num_bins = int(num_bins)
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nonfinite_count = 0
        # Histogram window: _counts[k] counts the values in bin _start + k of width 2**_exponent.
        # None while no width is fixed (no data, or all values equal to self.min).
        self._counts: np.ndarray | None = None
        self._exponent = 0
        self._start = 0

    def __repr__(self) -> str:
        return (
            f"TensorStatistics(count={self.count}, min={self.min}, max={self.max}, "
            f"nonfinite_count={self.nonfinite_count}, bin_width={self.bin_width})"
        )

    # ----------------------------------------------------------------------------- collecting

    def update(self, x: np.ndarray) -> None:
        """Add the values of ``x`` (any shape, any real dtype); NaN and inf are only counted."""
        data = _flat_real(x)
        if data.size == 0:
            return
        lo, hi = float(data.min()), float(data.max())  # NaN propagates, so this finds any
        if not (math.isfinite(lo) and math.isfinite(hi)):
            size = data.size
            data = data[np.isfinite(data)]
            self.nonfinite_count += size - data.size
            if data.size == 0:
                return
            lo, hi = float(data.min()), float(data.max())
        if self.keep_histogram:
            new_lo, new_hi = min(self.min, lo), max(self.max, hi)
            if new_lo != new_hi:
                self._cover(new_lo, new_hi, None)
                self._counts += self._bin_counts(data)
        self._add_scalars(data.size, lo, hi)

    def merge(self, other: TensorStatistics) -> None:
        """Add the values summarised by ``other`` (same tensor, collected elsewhere), exactly."""
        if other is self:
            raise ValueError("cannot merge a TensorStatistics into itself")
        if other.num_bins != self.num_bins or other.keep_histogram != self.keep_histogram:
            raise ValueError(
                "cannot merge statistics with different num_bins or keep_histogram: "
                f"({self.num_bins}, {self.keep_histogram}) vs "
                f"({other.num_bins}, {other.keep_histogram})"
            )
        self.nonfinite_count += other.nonfinite_count
        if other.count == 0:
            return
        if self.keep_histogram:
            new_lo, new_hi = min(self.min, other.min), max(self.max, other.max)
            if new_lo != new_hi:
                other_exponent = other._exponent if other._counts is not None else None
                self._cover(new_lo, new_hi, other_exponent)
                if other._counts is not None:
                    nz = np.flatnonzero(other._counts)
                    bins = _floor_shift(nz + other._start, self._exponent - other._exponent)
                    np.add.at(self._counts, bins - self._start, other._counts[nz])
                else:
                    self._counts[self._bin_of(other.min) - self._start] += other.count
        self._add_scalars(other.count, other.min, other.max)

    # ------------------------------------------------------------------------------ accessors

    @property
    def bin_width(self) -> float | None:
        """Width of the histogram bins, or None while no width is fixed."""
        return math.ldexp(1.0, self._exponent) if self._counts is not None else None

    def histogram(
        self, *, include_zero: bool = False, max_bins: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(bin_edges, counts)`` of the finite values, bins ``[edges[i], edges[i+1])``.

        The bins cover ``[min, max]`` (widened to reach 0 if ``include_zero``), at the native
        width or, if ``max_bins`` is given, merged by powers of two (exactly) until there are at
        most ``max_bins``. While all values are equal the result is one zero-width bin
        ``[v, v]``; with no values it is ``([0.0], [])``.
        """
        degenerate = self._degenerate_histogram(abs_values=False)
        if degenerate is not None:
            return degenerate
        lo_bin, hi_bin = self._bin_of(self.min), self._bin_of(self.max)
        if include_zero:
            lo_bin, hi_bin = min(lo_bin, 0), max(hi_bin, -1)
        nz = np.flatnonzero(self._counts)
        return self._regrid(nz + self._start, self._counts[nz], lo_bin, hi_bin, max_bins)

    def abs_histogram(self, *, max_bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(bin_edges, counts)`` of ``|x|``; ``edges[0] == 0``, otherwise as `histogram`.

        Folding is exact: bin ``-i - 1`` of x, ``[-(i + 1) w, -i w)``, holds the negative values
        whose ``|x|`` lies in ``(i w, (i + 1) w]``, merged into bin ``i``: a negative value
        exactly on an edge lands one bin below where ``floor(|x| / w)`` would put it.
        """
        degenerate = self._degenerate_histogram(abs_values=True)
        if degenerate is not None:
            return degenerate
        nz = np.flatnonzero(self._counts)
        bins = nz + self._start
        abs_bins = np.where(bins < 0, -bins - 1, bins)
        return self._regrid(abs_bins, self._counts[nz], 0, int(abs_bins.max()), max_bins)

    # ------------------------------------------------------------------------------- internal

    def _add_scalars(self, count: int, lo: float, hi: float) -> None:
        self.count += int(count)
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)

    def _bin_of(self, value: float) -> int:
        return math.floor(math.ldexp(value, -self._exponent))

    def _cover(self, lo: float, hi: float, min_exponent: int | None) -> None:
        """Make the window hold ``[lo, hi]`` (which contains all data so far), coarsening it."""
        floor_exponent = math.frexp(max(abs(lo), abs(hi)))[1] - 21
        candidates = [floor_exponent]
        if min_exponent is not None:
            candidates.append(min_exponent)
        if self._counts is not None:
            candidates.append(self._exponent)
        exponent = _fit_exponent(lo, hi, self.num_bins, max(candidates))
        lo_bin = math.floor(math.ldexp(lo, -exponent))
        hi_bin = math.floor(math.ldexp(hi, -exponent))
        if (
            self._counts is not None
            and exponent == self._exponent
            and self._start <= lo_bin
            and hi_bin < self._start + self.num_bins
        ):
            return
        start = lo_bin - (self.num_bins - 1 - (hi_bin - lo_bin)) // 2
        counts = np.zeros(self.num_bins, dtype=np.int64)
        if self._counts is not None:
            nz = np.flatnonzero(self._counts)
            bins = _floor_shift(nz + self._start, exponent - self._exponent)
            np.add.at(counts, bins - start, self._counts[nz])
        elif self.count > 0:  # all values so far equal self.min
            counts[math.floor(math.ldexp(self.min, -exponent)) - start] += self.count
        self._counts, self._exponent, self._start = counts, exponent, start

    def _bin_counts(self, data: np.ndarray) -> np.ndarray:
        """Counts per window bin of ``data``, which must lie in the window."""
        n_bins = self.num_bins
        work_dtype = data.dtype
        limit = 126 if work_dtype == np.float32 else 1000
        if abs(self._exponent) > limit:  # 2**-e not representable: scale in float64 by ldexp
            work_dtype = np.dtype(np.float64)
        scale = math.ldexp(1.0, -self._exponent)
        size = min(self._CHUNK, data.size)
        scaled = np.empty(size, dtype=work_dtype)
        index = np.empty(size, dtype=np.intp)
        total = np.zeros(n_bins, dtype=np.int64)
        for begin in range(0, data.size, self._CHUNK):
            chunk = data[begin : begin + self._CHUNK]
            t = scaled[: chunk.size]
            if abs(self._exponent) > limit:
                np.ldexp(chunk, -self._exponent, out=t, casting="unsafe")
            else:
                np.multiply(chunk, scale, out=t)  # exact: a power of two
            np.floor(t, out=t)
            np.subtract(t, self._start, out=t)  # exact: integers below 2**23
            idx = index[: chunk.size]
            np.copyto(idx, t, casting="unsafe")
            counts = np.bincount(idx, minlength=n_bins)
            if counts.size > n_bins:  # only if x * 2**-e underflowed to -0.0: bin -1 -> 0
                counts[n_bins - 1] += counts[n_bins:].sum()
                counts = counts[:n_bins]
            total += counts
        return total

    def _degenerate_histogram(self, *, abs_values: bool) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.keep_histogram:
            raise ValueError(
                "this TensorStatistics keeps no histogram (keep_histogram=False); "
                "only the minmax range can be computed from it"
            )
        if self.count == 0:
            return np.zeros(1), np.zeros(0, dtype=np.int64)
        if self._counts is None:
            value = abs(self.min) if abs_values else self.min
            return np.array([value, value]), np.array([self.count], dtype=np.int64)
        return None

    def _regrid(
        self, bins: np.ndarray, counts: np.ndarray, lo_bin: int, hi_bin: int, max_bins: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Histogram over native bins ``lo_bin..hi_bin`` of (bins, counts), coarsened if asked."""
        shift = 0
        if max_bins is not None:
            if max_bins < 1:
                raise ValueError(f"max_bins must be at least 1, got {max_bins}")
            while (hi_bin >> shift) - (lo_bin >> shift) + 1 > max_bins:
                shift += 1
        lo, hi = lo_bin >> shift, hi_bin >> shift
        out = np.zeros(hi - lo + 1, dtype=np.int64)
        np.add.at(out, _floor_shift(bins, shift) - lo, counts)
        edges = np.ldexp(np.arange(lo, hi + 2, dtype=np.float64), self._exponent + shift)
        return edges, out


def _flat_real(x: np.ndarray) -> np.ndarray:
    """``x`` as a 1-D float32 or float64 array (a view when possible)."""
    arr = np.asarray(x)
    if arr.dtype.kind == "f":
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float32 if arr.dtype.itemsize < 4 else np.float64)
    elif arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    else:
        raise TypeError(f"expected a real-valued array, got dtype {arr.dtype}")
    return arr.reshape(-1)


def _floor_shift(bins: np.ndarray, shift: int) -> np.ndarray:
    """``floor(bins / 2**shift)`` for int64 bin indices (all below 2**62 in magnitude)."""
    return np.floor_divide(bins, np.int64(1) << min(shift, 62))


def _fit_exponent(lo: float, hi: float, num_bins: int, min_exponent: int) -> int:
    """Smallest ``e >= min_exponent`` such that ``[lo, hi]`` spans at most num_bins bins of 2**e."""
    width = (hi / 2 - lo / 2) / (num_bins - 1)  # half the needed width; no overflow
    exponent = max(min_exponent, math.frexp(width)[1]) if width > 0 else min_exponent
    while math.floor(math.ldexp(hi, -exponent)) - math.floor(math.ldexp(lo, -exponent)) >= num_bins:
        exponent += 1
    return exponent
