"""Graph passes on small graphs: what they change, that they say so, and that ORT agrees."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import small_cnn, small_cnn_feeds, tiny_attention
from onnxq.config import ActivationType, QuantConfig
from onnxq.errors import ConfigError
from onnxq.passes import prepare
from onnxq.passes.annotate import annotate
from onnxq.passes.fold_batchnorm import FoldBatchNormPass
from onnxq.passes.insert_qdq import InsertQDQPass
from onnxq.passes.upgrade_opset import UpgradeOpsetPass
from onnxq.qparams import ActivationParams, QParams, activation_params, weight_params_for
from onnxq.report.kernels import integer_kernel_counts, optimized_op_counts


def _run(proto: onnx.ModelProto, feed):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_fold_batchnorm_keeps_outputs_and_reports_modified():
    proto = small_cnn(batchnorm=True)
    model = ir.from_proto(proto)
    result = FoldBatchNormPass()(model)
    assert result.modified
    assert "BatchNormalization" not in {n.op_type for n in result.model.graph}
    feed = small_cnn_feeds(1)[0]
    folded = _run(ir.to_proto(result.model), feed)[0]
    np.testing.assert_allclose(folded, _run(proto, feed)[0], rtol=1e-4, atol=1e-5)
    assert not FoldBatchNormPass()(result.model).modified  # nothing left to fold


def test_fold_batchnorm_leaves_shared_conv_output_alone():
    proto = small_cnn(batchnorm=True)
    proto.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, None))
    assert not FoldBatchNormPass()(ir.from_proto(proto)).modified


def test_upgrade_opset_from_11():
    weight = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]),
         helper.make_node("Clip", ["m"], ["y"], min=0.0, max=6.0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)], ir_version=7)
    result = UpgradeOpsetPass(13)(ir.from_proto(proto))
    assert result.modified
    assert result.model.opset_imports[""] == 13
    feed = {"x": np.array([[-3.0, 5.0]], np.float32)}
    np.testing.assert_allclose(_run(ir.to_proto(result.model), feed)[0], [[2.0, 2.0, 2.0]])
    assert not UpgradeOpsetPass(13)(result.model).modified


def test_annotate_cnn_chains_and_joins():
    model = prepare(ir.from_proto(small_cnn()))
    plan = annotate(model, QuantConfig())
    ops = sorted(plan.quantized_nodes.values())
    assert ops == sorted(["Conv", "Conv", "Relu", "MaxPool", "Add", "GlobalAveragePool",
                          "Flatten", "Gemm"])
    assert not plan.float_nodes
    # conv1 -> relu -> maxpool share one group, measured at the MaxPool output
    chain = plan.group_of("p1")
    assert len(chain.tensors) == 3 and chain.stats_tensor == "p1"
    assert {w.tensor.split("_")[0] for w in plan.weights} == {"w1", "w2", "fc"}
    assert all(w.axis == 0 for w in plan.weights)  # Gemm with transB: axis 0
    assert len(plan.biases) == 3


def test_annotate_exclude_by_op_type_name_and_glob():
    model = prepare(ir.from_proto(small_cnn()))
    plan = annotate(model, QuantConfig(exclude=("Add", "conv*")))
    assert set(plan.float_nodes) >= {"add1", "conv1", "conv2"}
    assert "excluded" in plan.float_reasons["add1"]
    with pytest.raises(ConfigError, match="matches no node"):
        annotate(model, QuantConfig(exclude=("LayerNormalization",)))


def test_annotate_attention_leaves_softmax_float():
    model = prepare(ir.from_proto(tiny_attention()))
    plan = annotate(model, QuantConfig())
    assert set(plan.quantized_nodes) == {"q_proj", "k_proj", "scores", "context"}
    # the MatMul output feeding the Transpose is float: the Transpose output is quantized
    assert plan.float_nodes == {"softmax": "Softmax", "k_t": "Transpose"}
    assert "kt" in plan.group_of("kt").tensors
    off = annotate(model, QuantConfig(quantize_activation_matmul=False))
    assert set(off.quantized_nodes) == {"q_proj", "k_proj"}


def _minmax_qparams(model, plan, proto, feeds):
    """Min/max ranges measured by running ORT with the group tensors exposed."""
    from onnxq.calibration.calibrate import expose_tensors
    names = plan.stats_tensors
    session = ort.InferenceSession(expose_tensors(proto, names).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    lows, highs = {n: 0.0 for n in names}, {n: 0.0 for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            lows[name], highs[name] = min(lows[name], value.min()), max(highs[name], value.max())
    weights = {w.tensor: model.graph.initializers[w.tensor].const_value.numpy() for w in plan.weights}
    acts: dict[str, ActivationParams] = {
        g.stats_tensor: activation_params(lows[g.stats_tensor], highs[g.stats_tensor], g)
        for g in plan.activation_groups}
    return QParams(acts, weight_params_for(plan, weights))


@pytest.mark.parametrize("act_type", list(ActivationType))
def test_insert_qdq_runs_integer_kernels_and_stays_close(act_type):
    proto = small_cnn()
    model = prepare(ir.from_proto(proto))
    plan = annotate(model, QuantConfig(activation_type=act_type))
    feeds = small_cnn_feeds(16)
    qparams = _minmax_qparams(model, plan, ir.to_proto(model), feeds)
    result = InsertQDQPass(plan, qparams)(model)
    assert result.modified
    quantized = ir.to_proto(result.model)
    onnx.checker.check_model(quantized)
    kernels = integer_kernel_counts(optimized_op_counts(quantized))
    assert kernels.get("QGemm") == 1
    if act_type is ActivationType.UINT8:  # the whole chain is integer
        assert kernels.get("QLinearConv") == 2
        assert kernels.get("QLinearAdd") == 1
    else:
        assert kernels.get("QLinearConv", 0) >= 1
    for feed in feeds[:4]:
        reference, got = _run(proto, feed)[0], _run(quantized, feed)[0]
        cosine = float(np.dot(reference.ravel(), got.ravel())
                       / np.linalg.norm(reference) / np.linalg.norm(got))
        assert cosine > 0.995


def test_insert_qdq_writes_the_given_codes():
    model = prepare(ir.from_proto(small_cnn()))
    plan = annotate(model, QuantConfig())
    qparams = _minmax_qparams(model, plan, ir.to_proto(model), small_cnn_feeds(4))
    quantized = InsertQDQPass(plan, qparams)(model).model
    consumed = {node.name: node for node in quantized.graph}
    for spec, params in qparams.weights.items():
        dequantize = consumed[spec.node].inputs[spec.input_index].producer()
        assert dequantize.op_type == "DequantizeLinear"
        np.testing.assert_array_equal(dequantize.inputs[0].const_value.numpy(), params.codes)


def test_smoothquant_is_exact_in_float_and_flattens_channels():
    from onnxq.passes.smooth import SmoothMatMulInputsPass, smoothing_candidates

    proto = tiny_attention()
    model = prepare(ir.from_proto(proto))
    assert smoothing_candidates(model) == ["x"]
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (1, 5, 16)).astype(np.float32)
    x[..., 3] *= 40.0  # an outlier channel
    absmax = {"x": np.abs(x).reshape(-1, 16).max(axis=0)}
    result = SmoothMatMulInputsPass(absmax, alpha=0.8)(model)
    assert result.modified
    smoothed = ir.to_proto(result.model)
    np.testing.assert_allclose(_run(smoothed, {"x": x})[0], _run(proto, {"x": x})[0], rtol=1e-4,
                               atol=1e-5)
    mul = next(n for n in result.model.graph if n.op_type == "Mul")
    inverse = mul.inputs[1].const_value.numpy()
    flattened = np.abs(x).reshape(-1, 16).max(axis=0) * inverse
    assert flattened.max() / flattened.min() < absmax["x"].max() / absmax["x"].min() / 5
    # the context MatMul reads x as its second operand: it keeps the unsmoothed x
    context = next(n for n in result.model.graph if n.name == "context")
    assert context.inputs[1].name == "x"


def _channel_absmax(proto: onnx.ModelProto, names: list[str], feeds) -> dict[str, np.ndarray]:
    from onnxq.calibration.calibrate import ChannelAbsMax, observe

    observers = {name: ChannelAbsMax(axis=1) for name in names}
    observe(proto, {name: [o] for name, o in observers.items()}, feeds)
    return {name: o.value for name, o in observers.items()}


def test_equalize_is_exact_in_float_and_flattens_channels():
    from graphs import affine_cnn
    from onnxq.passes.equalize import EqualizeChannelsPass, equalization_candidates

    proto = affine_cnn()
    model = prepare(ir.from_proto(proto))
    # a (Conv -> Mul), hcd (Add(Mul) -> depthwise Conv), b (Conv -> Relu -> dense 1x1 Conv:
    # only when dense Convs may pay); akb feeds HardSwish, c feeds Sigmoid: left alone
    assert equalization_candidates(model) == ["a", "hcd"]
    assert equalization_candidates(model, dense=True) == ["a", "hcd", "b"]
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.normal(0, 1, (1, 3, 12, 12)).astype(np.float32)} for _ in range(4)]
    before = _channel_absmax(proto, ["a", "hcd"], feeds)
    result = EqualizeChannelsPass(before)(model)
    assert result.modified
    equalized = ir.to_proto(result.model)
    for feed in feeds:
        np.testing.assert_allclose(_run(equalized, feed)[0], _run(proto, feed)[0], rtol=1e-4, atol=1e-6)
    after = _channel_absmax(equalized, ["a", "hcd"], feeds)
    for name in ("a", "hcd"):
        assert before[name].max() / before[name].min() > 10
        np.testing.assert_allclose(after[name], after[name].max(), rtol=1e-3)  # one range
    # the shared scalar became two per-channel constants; the original initializer is gone
    names = {v.name for n in result.model.graph for v in n.inputs if v is not None}
    assert "gain" not in names and "gain" not in result.model.graph.initializers
    assert not EqualizeChannelsPass({})(result.model).modified


def test_equalize_raises_int8_fidelity_of_spread_channels():
    import onnxq
    from graphs import affine_cnn
    from onnxq.config import QuantConfig

    proto = affine_cnn()
    rng = np.random.default_rng(5)
    calib = {"x": rng.normal(0, 1, (24, 3, 12, 12)).astype(np.float32)}
    cosines = {}
    for equalize in (False, True):
        result = onnxq.quantize(proto, calib, QuantConfig(equalize=equalize, reduce_range=False))
        cosines[equalize] = min(o.cosine for o in result.fidelity.outputs)
    assert cosines[True] > cosines[False]
    assert 1 - cosines[True] < (1 - cosines[False]) / 2
