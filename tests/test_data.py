"""Calibration data: the three accepted forms, and every mismatch as one clear error."""

import numpy as np
import pytest

from graphs import small_cnn
from onnxq.data import open_calibration
from onnxq.errors import CalibrationDataError


def _samples(count=6, seed=0):
    return np.random.default_rng(seed).normal(0, 1, (count, 3, 16, 16)).astype(np.float32)


def test_stacked_npz(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=_samples(6))
    feeds = open_calibration(path, small_cnn())
    assert len(feeds) == 6
    assert [f["x"].shape for f in feeds] == [(1, 3, 16, 16)] * 6


def test_folder_of_feeds_and_split(tmp_path):
    for i in range(5):
        np.savez(tmp_path / f"feed_{i}.npz", x=_samples(1, seed=i))
    feeds = open_calibration(tmp_path, small_cnn())
    calibration, held_out = feeds.split(2, np.random.default_rng(0))
    assert (len(calibration), len(held_out)) == (3, 2)
    seen = [f["x"].tobytes() for f in calibration] + [f["x"].tobytes() for f in held_out]
    assert len(set(seen)) == 5  # disjoint and complete


def test_iterable_of_dicts():
    feeds = open_calibration(({"x": s[None]} for s in _samples(3)), small_cnn())
    assert len(feeds) == 3


@pytest.mark.parametrize("arrays, message", [
    ({"image": _samples(2)}, "missing input.* x.*unknown name.* image"),
    ({"x": _samples(2).astype(np.float64)}, "dtype float64"),
    ({"x": _samples(2)[:, :2]}, r"shape \[1, 2, 16, 16\]"),
    ({"x": _samples(2)[:, 0]}, "rank 4"),
])
def test_mismatched_feeds_are_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(CalibrationDataError, match=message):
        list(open_calibration(path, small_cnn()))


def test_nan_is_an_error_naming_the_feed(tmp_path):
    samples = _samples(4)
    samples[2, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=samples)
    feeds = open_calibration(tmp_path / "nan.npz", small_cnn())
    with pytest.raises(CalibrationDataError, match="sample 2 .* NaN"):
        list(feeds)


def test_missing_empty_and_unreadable(tmp_path):
    with pytest.raises(CalibrationDataError, match="not found"):
        open_calibration(tmp_path / "nope.npz", small_cnn())
    with pytest.raises(CalibrationDataError, match="no .npz files"):
        open_calibration(tmp_path, small_cnn())
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationDataError, match="cannot read"):
        open_calibration(tmp_path / "junk.npz", small_cnn())
