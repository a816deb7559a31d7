"""Reading models with external weight data, and writing atomically."""

import onnx
import pytest

import onnxq
from graphs import small_cnn, small_cnn_feeds
from onnxq.errors import ModelError, OnnxqError
from onnxq.model_io import check_output_path, load_model, save_model_atomic


def test_model_with_external_data_is_read_and_quantized(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    path = source / "cnn.onnx"
    onnx.save_model(small_cnn(), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="cnn.weights", size_threshold=0)
    assert (source / "cnn.weights").stat().st_size > 1000
    loaded = load_model(path)
    assert all(not t.external_data for t in loaded.graph.initializer)
    result = onnxq.quantize(path, small_cnn_feeds(12))
    out = result.save(tmp_path / "out" / "cnn.int8.onnx")
    reread = onnx.load(str(out))
    assert {n.op_type for n in reread.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert result.fidelity.worst_cosine > 0.99


def test_missing_external_data_is_a_model_error(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save_model(small_cnn(), str(path), save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(ModelError, match="external"):
        load_model(path)


def test_save_is_atomic_and_refuses_the_input(tmp_path):
    path = tmp_path / "m.onnx"
    save_model_atomic(small_cnn(), path)
    assert onnx.load(str(path)).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(OnnxqError, match="is the input"):
        check_output_path(path, tmp_path / "." / "m.onnx")
    with pytest.raises(OnnxqError, match="folder"):
        check_output_path(path, tmp_path)
