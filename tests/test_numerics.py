"""The numeric core against ONNX Runtime's own QuantizeLinear / DequantizeLinear."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq import numerics
from onnxq.numerics import INT8, UINT8, IntRange


def _ort_quantize(x, scale, zero_point, axis):
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "z")]
    attrs = {} if axis is None else {"axis": axis}
    zp_type = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("q", zp_type, list(x.shape)),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize("grid", [UINT8, INT8])
def test_per_tensor_matches_onnxruntime(grid):
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 3, (4, 50)) + 1).astype(np.float32)
    x[0, :4] = [0.5, 1.5, -2.5, 1000.0]  # ties and saturation
    scale, zero_point = numerics.asymmetric_params(x.min() * 0.8, x.max() * 0.5, grid)
    zp = np.asarray(zero_point, grid.dtype)
    q_ref, y_ref = _ort_quantize(x, np.float32(scale), zp, None)
    q = numerics.quantize(x, scale, zp, grid)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(numerics.dequantize(q, scale, zp), y_ref)


def test_per_channel_matches_onnxruntime():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (6, 3, 3, 3)).astype(np.float32)
    scales = numerics.symmetric_weight_scales(w, INT8, axis=0)
    zero = np.zeros(6, np.int8)
    q_ref, y_ref = _ort_quantize(w, scales, zero, 0)
    q = numerics.quantize(w, scales, zero, INT8, axis=0)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(numerics.dequantize(q, scales, zero, axis=0), y_ref)
    # the restricted range keeps -127..127 and the largest |w| of each channel hits 127
    assert q.min() >= -127
    assert np.all(np.abs(q).reshape(6, -1).max(axis=1) == 127)


def test_zero_is_exact_and_range_is_covered():
    scale, zero_point = numerics.asymmetric_params(0.3, 5.0, UINT8)  # lo widened to 0
    assert zero_point == 0
    assert numerics.dequantize(np.array([255], np.uint8), scale, zero_point)[0] == pytest.approx(5.0)
    scale, zero_point = numerics.asymmetric_params(-1.0, 3.0, UINT8)
    x = np.array([0.0], np.float32)
    assert numerics.fake_quantize(x, scale, zero_point, UINT8)[0] == 0.0
    assert zero_point == round(255 / 4)


def test_symmetric_activation_params():
    scale, zero_point = numerics.symmetric_params(-2.0, 1.0, INT8)
    assert zero_point == 0
    assert scale == pytest.approx(4.0 / 255)


def test_bias_uses_product_of_scales():
    bias = np.array([0.5, -1.25, 3.0], np.float32)
    codes, scales = numerics.quantize_bias(bias, 0.02, np.array([0.1, 0.2, 0.05], np.float32))
    np.testing.assert_allclose(scales, [0.002, 0.004, 0.001], rtol=1e-6)
    np.testing.assert_array_equal(codes, [250, -312, 3000])


def test_int_range():
    assert (IntRange(4, True).qmin, IntRange(4, True).qmax) == (-8, 7)
    assert (IntRange(3, False).qmin, IntRange(3, False).qmax) == (0, 7)
    with pytest.raises(ValueError):
        IntRange(1, True)


def test_cosine_and_sqnr():
    a = np.array([1.0, 2.0, 3.0])
    assert numerics.cosine(a, 2 * a) == pytest.approx(1.0)
    assert numerics.sqnr_db(a, a + 0.01 * a) == pytest.approx(40.0)
    assert numerics.sqnr_db(a, a) == float("inf")
