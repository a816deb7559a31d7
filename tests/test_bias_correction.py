"""Bias correction: the predicted output shift equals what ORT computes for the weight error."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from graphs import small_cnn, small_cnn_feeds
from onnxq.calibration.bias_correction import RunningChannelMean, conv_output_shift, gemm_output_shift


def _conv(weight: np.ndarray, x: np.ndarray, group: int) -> np.ndarray:
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], group=group)], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("group", [1, 2, 8])
def test_conv_shift_matches_conv_of_the_error_on_the_mean_input(group):
    rng = np.random.default_rng(group)
    error = rng.normal(0, 0.01, (8, 8 // group, 3, 3)).astype(np.float32)
    mean = rng.normal(0, 1, 8)
    x = np.broadcast_to(mean.reshape(1, 8, 1, 1), (1, 8, 5, 5)).astype(np.float32)
    expected = _conv(error, x, group)[0, :, 0, 0]
    np.testing.assert_allclose(conv_output_shift(error, mean, group), expected, rtol=1e-4, atol=1e-6)


def test_gemm_shift_and_running_mean():
    rng = np.random.default_rng(0)
    error, mean = rng.normal(size=(4, 6)), rng.normal(size=6)
    np.testing.assert_allclose(gemm_output_shift(error, mean, trans_b=True), error @ mean)
    np.testing.assert_allclose(gemm_output_shift(error.T, mean, trans_b=False), error @ mean)
    running = RunningChannelMean(axis=1)
    chunks = [rng.normal(size=(1, 3, h, 4)) for h in (2, 5, 7)]
    for chunk in chunks:
        running.update(chunk)
    flat = np.concatenate([c.transpose(0, 2, 3, 1).reshape(-1, 3) for c in chunks])
    np.testing.assert_allclose(running.mean, flat.mean(axis=0))


def test_bias_correction_reduces_the_mean_output_error():
    model, feeds = small_cnn(), small_cnn_feeds(40)
    errors = {}
    for enabled in (False, True):
        result = onnxq.quantize(model, feeds, onnxq.QuantConfig(bias_correction=enabled, holdout=0))
        float_session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        quant_session = ort.InferenceSession(result.model.SerializeToString(),
                                             providers=["CPUExecutionProvider"])
        diff = [quant_session.run(None, f)[0] - float_session.run(None, f)[0] for f in feeds]
        errors[enabled] = float(np.abs(np.mean(diff, axis=0)).mean())
    assert errors[True] < errors[False]
