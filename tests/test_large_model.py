"""Models past protobuf's 2 GB limit: sizes and checks that never serialize them, and (slow) a
2.2 GB model quantized end to end through the command line.

models/large_transformer.py builds a 2.2 GB synthetic encoder with external data; `onnxq
quantize` must read it, calibrate, write the int8 model with its own external data beside it
(no temporary files left), and the result must load in ONNX Runtime and track the float model.
Peak memory and timings are figures of benchmarks/large_model.py, not asserted here. The fast
tests run the same paths on a small model by lowering `model_io.EXTERNAL_DATA_THRESHOLD`.
"""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxq
from onnxq import model_io
from onnxq.errors import ModelError
from onnxq.zoo import large_transformer
from onnxq.zoo.common import cosine_rows, feed_paths, load_feeds

SMALL = large_transformer.TransformerShape(hidden=64, ffn=128, heads=4, layers=2)


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_builder_writes_a_checked_model_with_external_data_and_feeds(tmp_path):
    built = large_transformer.build(tmp_path / "a", SMALL, n_calib=3)
    again = large_transformer.build(tmp_path / "b", SMALL, n_calib=3)
    assert built.data_path.read_bytes() == again.data_path.read_bytes()  # seeded
    assert built.data_path.stat().st_size >= SMALL.parameters * 4 * 0.9  # the matrices are outside
    assert model_io.has_external_data(built.onnx_path)
    onnx.checker.check_model(str(built.onnx_path))
    feeds = load_feeds(built.calib_dir)
    assert len(feed_paths(built.calib_dir)) == 3 and len({f["x"].shape[1] for f in feeds}) > 1
    for feed in feeds:  # dynamic batch and sequence
        assert session(built.onnx_path).run(None, feed)[0].shape == feed["x"].shape


def test_sizes_and_checks_past_the_threshold_go_through_files(tmp_path, monkeypatch):
    built = large_transformer.build(tmp_path, SMALL, n_calib=2)
    proto = model_io.load_model(built.onnx_path)
    exact = proto.ByteSize()
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)  # the small model counts as big
    estimate = model_io.serialized_size(proto)
    assert estimate == model_io.inline_tensor_bytes(proto) and 0.95 < estimate / exact <= 1  # names, nodes
    model_io.check_model(proto, "the big model")  # by path, through a temporary copy
    proto.graph.node[0].input[0] = "nowhere"
    with pytest.raises(ModelError, match="^the big model fails the ONNX checker: "):
        model_io.check_model(proto, "the big model")


def test_a_model_read_with_external_data_is_written_with_external_data(tmp_path):
    built = large_transformer.build(tmp_path / "model", SMALL, n_calib=6)
    out = onnxq.quantize(built.onnx_path, built.calib_dir).save(tmp_path / "out" / "q.onnx")
    assert model_io.has_external_data(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.card.json", "q.card.md", "q.onnx",
                                                            "q.onnx.data"]
    feed = load_feeds(built.calib_dir)[0]
    expected, got = session(built.onnx_path).run(None, feed)[0], session(out).run(None, feed)[0]
    assert cosine_rows(got.reshape(1, -1), expected.reshape(1, -1))[0] > 0.9


@pytest.mark.slow
def test_a_model_past_2_gb_quantizes_with_external_data(tmp_path):
    built = large_transformer.build(tmp_path / "model")
    float_bytes = built.onnx_path.stat().st_size + built.data_path.stat().st_size
    assert float_bytes > 2**31
    out = tmp_path / "out" / "q.onnx"
    run = subprocess.run([sys.executable, "-m", "onnxq", "quantize", built.onnx_path, out, "--calib",
                          built.calib_dir, "--json"], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["quantized_ops"]["MatMul"] == 8 * large_transformer.TransformerShape().layers
    assert summary["fidelity"]["outputs"][0]["cosine"] > 0.9

    data = out.with_name("q.onnx.data")
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.card.json", "q.card.md", "q.onnx",
                                                            "q.onnx.data"]  # no temporary files
    written = onnx.load(str(out), load_external_data=False)
    assert {e.value for t in written.graph.initializer for e in t.external_data if e.key == "location"} == \
        {"q.onnx.data"}
    assert 0.2 < (out.stat().st_size + data.stat().st_size) / float_bytes < 0.3  # int8 weights

    feed = load_feeds(built.calib_dir)[0]
    expected = session(built.onnx_path).run(None, feed)[0]
    got = session(out).run(None, feed)[0]
    assert got.shape == expected.shape
    assert cosine_rows(got.reshape(1, -1), expected.reshape(1, -1))[0] > 0.9
    assert np.isfinite(got).all()
