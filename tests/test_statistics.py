"""Streamed tensor statistics and the range methods, checked against one-shot numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy as scipy_kl

from onnxq.calibration.ranges import (
    METHODS,
    _expected_sq_error,
    _window_kl,
    compute_range,
    entropy_range,
    minmax_range,
    mse_range,
    percentile_range,
)
from onnxq.calibration.statistics import TensorStatistics

SHAPES = [(700,), (30, 50), (2, 30, 40), (1, 1, 90, 20), (), (0,), (110, 10)]


def _chunks(seed: int, count: int = 40) -> list[np.ndarray]:
    """Feeds of varying shapes, dtypes and scales, so the histogram must grow while streaming."""
    rng = np.random.default_rng(seed)
    out = [np.zeros((4, 4), dtype=np.float32)]  # all-zero feed first: no width fixed yet
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        scale = 10.0 ** rng.uniform(-3, 2) * (1 + i / 10)
        dtype = (np.float32, np.float64, np.float16)[i % 3]
        out.append((rng.standard_normal(shape) * scale + rng.uniform(-1, 3)).astype(dtype))
    return out


def _finite_concat(chunks: list[np.ndarray]) -> np.ndarray:
    values = np.concatenate([np.asarray(c, dtype=np.float64).ravel() for c in chunks])
    return values[np.isfinite(values)]


def _streamed(chunks: list[np.ndarray], **kwargs: object) -> TensorStatistics:
    stats = TensorStatistics(**kwargs)
    for chunk in chunks:
        stats.update(chunk)
    return stats


def _assert_exact_histogram(stats: TensorStatistics, values: np.ndarray) -> None:
    """Counts equal a one-shot binning of all values on the statistics' final grid."""
    width = stats.bin_width
    edges, counts = stats.histogram()
    bins = np.floor(values / width).astype(np.int64)
    expected = np.bincount(bins - bins.min())
    np.testing.assert_array_equal(counts, expected)
    assert edges[0] <= values.min() < edges[1] and edges[-2] <= values.max() < edges[-1]
    np.testing.assert_allclose(np.diff(edges), width)
    abs_edges, abs_counts = stats.abs_histogram()
    scaled = values / width  # negative bin [-(i+1)w, -iw) folds onto |x| in (iw, (i+1)w]
    abs_bins = np.where(scaled < 0, np.ceil(-scaled) - 1, np.floor(scaled)).astype(np.int64)
    np.testing.assert_array_equal(abs_counts, np.bincount(abs_bins))
    assert abs_edges[0] == 0.0


def _fake_quant_mse(x: np.ndarray, lo: float, hi: float, num_levels: int) -> float:
    """Really quantize x on the asymmetric grid [lo, hi] (zero exact) and return the MSE."""
    scale = (hi - lo) / num_levels
    zero_point = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zero_point, 0, num_levels)
    return float(np.mean(((q - zero_point) * scale - x) ** 2))


def _gaussian_stats(n: int, seed: int, sigma: float = 1.0) -> tuple[TensorStatistics, np.ndarray]:
    x = (np.random.default_rng(seed).standard_normal(n) * sigma).astype(np.float32)
    return _streamed(np.array_split(x, 7), num_bins=4096), x.astype(np.float64)


# ---------------------------------------------------------------------------- statistics


def test_streamed_statistics_equal_one_shot() -> None:
    chunks = _chunks(seed=0)
    stats = _streamed(chunks)
    values = _finite_concat(chunks)
    assert stats.min == values.min() and stats.max == values.max()
    assert stats.count == values.size and stats.nonfinite_count == 0
    _assert_exact_histogram(stats, values)
    # The data fill at least half of the window's bins.
    assert (values.max() - values.min()) / stats.bin_width >= stats.num_bins / 2 - 1
    for p in (99.0, 90.0, 50.0):  # percentile_range clamps to 0, so compare each side with it
        lo, hi = percentile_range(stats, num_levels=255, symmetric=False, percentile=p)
        assert abs(lo - min(np.percentile(values, 100 - p), 0.0)) <= stats.bin_width
        assert abs(hi - max(np.percentile(values, p), 0.0)) <= stats.bin_width


def test_merge_equals_streaming_everything() -> None:
    chunks = _chunks(seed=1)
    left, right = _streamed(chunks[::2]), _streamed(chunks[1::2])
    right.update(np.array([np.nan, -np.inf]))
    left.merge(right)
    values = _finite_concat(chunks)
    assert (left.min, left.max, left.count) == (values.min(), values.max(), values.size)
    assert left.nonfinite_count == 2
    _assert_exact_histogram(left, values)
    constant = TensorStatistics()
    constant.update(np.full(5, 2.5))
    left.merge(constant)
    _assert_exact_histogram(left, np.append(values, np.full(5, 2.5)))
    with pytest.raises(ValueError):
        left.merge(TensorStatistics(num_bins=1024))


def test_growth_from_tiny_to_huge_keeps_counts_exact() -> None:
    rng = np.random.default_rng(2)
    chunks = [rng.standard_normal(100) * 1e-6, rng.random(50) * 1e3, -rng.random(10) * 1e7]
    stats = _streamed(chunks, num_bins=256)
    _assert_exact_histogram(stats, _finite_concat(chunks))


def test_memory_does_not_grow_with_feeds() -> None:
    rng = np.random.default_rng(3)
    stats = TensorStatistics(num_bins=512)
    for i in range(1000):
        stats.update(rng.standard_normal((i % 13) + 1) * (1 + i))
        arrays = [v for v in vars(stats).values() if isinstance(v, np.ndarray)]
        assert sum(a.size for a in arrays) <= stats.num_bins
    assert stats.count == sum((i % 13) + 1 for i in range(1000))


def test_nonfinite_values_are_counted_and_left_out() -> None:
    stats = TensorStatistics()
    stats.update(np.array([[1.0, np.nan], [np.inf, -np.inf]], dtype=np.float32))
    stats.update(np.array([-3.4e38, 0.5, -2.0], dtype=np.float32))
    stats.update(np.full(3, np.nan))
    assert stats.nonfinite_count == 6
    assert stats.count == 4
    assert stats.min == pytest.approx(-3.4e38, rel=1e-6) and stats.max == 1.0
    _, counts = stats.histogram()
    assert counts.sum() == 4


def test_zero_feeds_then_small_data_keep_resolution() -> None:
    stats = TensorStatistics()
    stats.update(np.zeros(1000))
    assert stats.bin_width is None
    stats.update(np.linspace(-1e-5, 1e-5, 101))
    assert stats.bin_width <= 2e-5 / (stats.num_bins / 2)
    _assert_exact_histogram(stats, np.concatenate([np.zeros(1000), np.linspace(-1e-5, 1e-5, 101)]))


def test_without_histogram_only_minmax_works() -> None:
    stats = TensorStatistics(keep_histogram=False)
    stats.update(np.arange(-3.0, 5.0))
    assert minmax_range(stats, num_levels=255, symmetric=False) == (-3.0, 4.0)
    with pytest.raises(ValueError, match="histogram"):
        stats.histogram()
    for method in ("percentile", "entropy", "mse"):
        with pytest.raises(ValueError, match="histogram"):
            compute_range(method, stats, num_levels=255, symmetric=True)


# -------------------------------------------------------------------------------- ranges


def _data(kind: str, rng: np.random.Generator) -> np.ndarray:
    n = 50_000
    if kind == "gauss":
        return rng.standard_normal(n)
    if kind == "relu":
        return np.maximum(rng.standard_normal(n), 0.0)
    if kind == "negative":
        return -rng.exponential(2.0, n)
    if kind == "offset":
        return rng.uniform(5.0, 6.0, n)
    if kind == "gelu":
        return np.where(rng.random(n) < 0.3, -0.17 * rng.random(n), rng.exponential(1.0, n))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["gauss", "relu", "negative", "offset", "gelu"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("num_levels", [15, 255, 65535])
def test_every_method_gives_a_valid_range(kind: str, symmetric: bool, num_levels: int) -> None:
    x = _data(kind, np.random.default_rng(4))
    stats = _streamed(np.array_split(x, 5))
    for method in METHODS:
        lo, hi = compute_range(method, stats, num_levels=num_levels, symmetric=symmetric)
        assert isinstance(lo, float) and isinstance(hi, float)
        assert lo <= 0.0 <= hi and lo < hi, method
        if symmetric:
            assert lo == -hi, method
            assert hi <= np.abs(x).max(), method
        else:
            assert min(x.min(), 0.0) <= lo and hi <= max(x.max(), 0.0), method


@pytest.mark.parametrize("symmetric", [False, True])
def test_degenerate_tensors(symmetric: bool) -> None:
    empty, zeros, positive, negative = (TensorStatistics() for _ in range(4))
    empty.update(np.array([np.nan]))
    zeros.update(np.zeros((2, 3)))
    positive.update(np.full(4, 2.5, dtype=np.float32))
    negative.update(np.array([-1.0]))
    for method in METHODS:
        for stats, expected in [
            (empty, (0.0, 0.0)),
            (zeros, (0.0, 0.0)),
            (positive, (-2.5, 2.5) if symmetric else (0.0, 2.5)),
            (negative, (-1.0, 1.0) if symmetric else (-1.0, 0.0)),
        ]:
            assert compute_range(method, stats, num_levels=255, symmetric=symmetric) == expected


def test_unknown_method_and_bad_arguments() -> None:
    stats, _ = _gaussian_stats(1000, seed=5)
    with pytest.raises(ValueError, match="unknown range method"):
        compute_range("kl", stats, num_levels=255, symmetric=True)
    with pytest.raises(ValueError):
        percentile_range(stats, num_levels=255, symmetric=True, percentile=0.0)
    with pytest.raises(ValueError):
        minmax_range(stats, num_levels=0, symmetric=True)


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.999])
def test_percentile_range_matches_numpy(percentile: float) -> None:
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.standard_normal(150_000) * 2 + 1, rng.exponential(3.0, 50_000)])
    stats = _streamed(np.array_split(x, 9))
    width = stats.bin_width
    lo, hi = percentile_range(stats, num_levels=255, symmetric=False, percentile=percentile)
    assert abs(lo - np.percentile(x, 100 - percentile)) <= width
    assert abs(hi - np.percentile(x, percentile)) <= width
    neg, a = percentile_range(stats, num_levels=255, symmetric=True, percentile=percentile)
    assert neg == -a and abs(a - np.percentile(np.abs(x), percentile)) <= width


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_clips_an_outlier_and_beats_minmax(symmetric: bool) -> None:
    rng = np.random.default_rng(7)
    x = np.append(rng.standard_normal(1_000_000), 30.0).astype(np.float32).astype(np.float64)
    stats = _streamed(np.array_split(x, 4))
    lo, hi = mse_range(stats, num_levels=255, symmetric=symmetric)
    assert hi < 30.0
    mm_lo, mm_hi = minmax_range(stats, num_levels=255, symmetric=symmetric)
    assert _fake_quant_mse(x, lo, hi, 255) < 0.8 * _fake_quant_mse(x, mm_lo, mm_hi, 255)
    for method in ("percentile", "entropy"):  # the MSE-optimal range is at least as good
        m_lo, m_hi = compute_range(method, stats, num_levels=255, symmetric=symmetric)
        assert _fake_quant_mse(x, lo, hi, 255) <= _fake_quant_mse(x, m_lo, m_hi, 255) * 1.01


def test_mse_error_model_matches_real_fake_quantization() -> None:
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.standard_normal(60_000), rng.exponential(2.0, 40_000)])
    stats = _streamed([x])
    edges, counts = stats.histogram(include_zero=True, max_bins=2048)
    lo = np.array([x.min(), -3.0, -1.0])
    hi = np.array([x.max(), 6.0, 2.0])
    for num_levels in (15, 255):
        model = _expected_sq_error(edges, counts, lo, hi, num_levels) / x.size
        real = [_fake_quant_mse(x, a, b, num_levels) for a, b in zip(lo, hi, strict=True)]
        np.testing.assert_allclose(model, real, rtol=0.03)


def test_entropy_threshold_on_gaussian_is_a_few_sigma() -> None:
    sigma = 0.7
    stats, _ = _gaussian_stats(400_000, seed=9, sigma=sigma)
    lo, hi = entropy_range(stats, num_levels=255, symmetric=True)
    assert lo == -hi and 2 * sigma < hi < 6 * sigma
    lo, hi = entropy_range(stats, num_levels=255, symmetric=False)
    assert -6 * sigma < lo < -2 * sigma and 2 * sigma < hi < 6 * sigma


def test_entropy_clips_a_one_sided_outlier_only_on_its_side() -> None:
    rng = np.random.default_rng(10)
    x = np.append(rng.standard_normal(200_000), [40.0, 41.0])
    stats = _streamed([x])
    lo, hi = entropy_range(stats, num_levels=255, symmetric=False)
    assert hi < 10.0 and lo < -2.5


def test_window_kl_matches_tensorrt_reference() -> None:
    rng = np.random.default_rng(11)
    for hist, quant_bins in [
        (rng.poisson(np.exp(-np.linspace(0, 6, 300)) * 500).astype(float), 16),
        (np.where(rng.random(200) < 0.3, 0.0, rng.integers(1, 50, 200)).astype(float), 32),
    ]:
        ends = np.arange(quant_bins, hist.size + 1)
        fast = _window_kl(hist, np.zeros_like(ends), ends, quant_bins)
        for end, value in zip(ends, fast, strict=True):
            inside = hist[:end]
            group = np.arange(end) * quant_bins // end
            mass = np.bincount(group, weights=inside, minlength=quant_bins)
            filled = np.bincount(group, weights=inside > 0, minlength=quant_bins)
            q = np.where(inside > 0, mass[group] / np.maximum(filled[group], 1), 0.0)
            p = inside.copy()
            p[-1] += hist[end:].sum()
            expected = scipy_kl(p, q)
            assert value == expected or abs(value - expected) < 1e-9


def test_relu_outputs_get_a_sensible_upper_end() -> None:
    rng = np.random.default_rng(12)
    x = np.maximum(rng.standard_normal(300_000), 0.0)
    stats = _streamed(np.array_split(x, 3))
    for method in METHODS:
        lo, hi = compute_range(method, stats, num_levels=255, symmetric=False)
        assert lo == 0.0 and 2.5 < hi <= x.max(), method
