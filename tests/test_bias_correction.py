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


def test_a_dead_channel_keeps_its_bias_instead_of_overflowing_int32():
    """Channel 0 of conv1 has all-zero weights and a bias: its output is that bias everywhere.
    At the smallest weight scale the bias overflows int32; the weight scale rises instead."""
    import onnx
    from onnx import numpy_helper

    import onnxq
    from graphs import small_cnn, small_cnn_feeds
    from onnxq.config import QuantConfig

    proto = small_cnn(batchnorm=False)
    for index, tensor in enumerate(proto.graph.initializer):
        array = numpy_helper.to_array(tensor).copy()
        if tensor.name == "w1":
            array[0] = 0.0
        elif tensor.name == "b1":
            array[0] = 0.75
        else:
            continue
        proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    result = onnxq.quantize(proto, small_cnn_feeds(24), QuantConfig(bias_correction=False))
    initializers = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    dequantize = next(n for n in result.model.graph.node if n.op_type == "DequantizeLinear"
                      and initializers.get(n.input[0]) is not None
                      and initializers[n.input[0]].dtype == np.int32 and "b1" in n.input[0])
    codes = initializers[dequantize.input[0]].astype(np.int64)
    bias = codes * initializers[dequantize.input[1]]
    assert np.abs(codes).max() < np.iinfo(np.int32).max // 8  # room left, nothing clipped
    np.testing.assert_allclose(bias[0], 0.75, rtol=1e-6)
    assert isinstance(result.model, onnx.ModelProto)
