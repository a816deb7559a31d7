"""Small hand-built ONNX graphs for pass and pipeline tests (3-12 nodes, seeded weights)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def small_cnn(seed: int = 0, batchnorm: bool = True, relu6: bool = False) -> onnx.ModelProto:
    """x -> Conv -> [BN] -> Relu (`relu6`: Clip(0, 6)) -> MaxPool -> Conv -> Add(residual) -> GAP
    -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", rng.normal(0, 0.3, (8, 3, 3, 3))), _init("b1", rng.normal(0, 0.1, 8)),
        _init("w2", rng.normal(0, 0.2, (8, 8, 3, 3))), _init("b2", rng.normal(0, 0.1, 8)),
        _init("fc_w", rng.normal(0, 0.3, (10, 8))), _init("fc_b", rng.normal(0, 0.1, 10)),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    source = "c1"
    if batchnorm:
        inits += [_init("gamma", rng.uniform(0.5, 1.5, 8)), _init("beta", rng.normal(0, 0.1, 8)),
                  _init("mean", rng.normal(0, 0.1, 8)), _init("var", rng.uniform(0.5, 2.0, 8))]
        nodes.append(helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"],
                                      ["bn1"], name="bn1", epsilon=1e-5))
        source = "bn1"
    if relu6:
        inits += [_init("zero", np.array(0.0)), _init("six", np.array(6.0))]
    nodes += [
        helper.make_node("Clip", [source, "zero", "six"], ["r1"], name="relu1") if relu6 else
        helper.make_node("Relu", [source], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "p1"], ["a1"], name="add1"),
        helper.make_node("GlobalAveragePool", ["a1"], ["g1"], name="gap"),
        helper.make_node("Flatten", ["g1"], ["f1"], name="flatten"),
        helper.make_node("Gemm", ["f1", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)


def small_cnn_feeds(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


def tiny_attention(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul(Wq), MatMul(Wk) -> MatMul(q, k^T) -> Softmax -> MatMul(., x) -> out."""
    rng = np.random.default_rng(seed)
    inits = [_init("wq", rng.normal(0, 0.3, (16, 16))), _init("wk", rng.normal(0, 0.3, (16, 16)))]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "x"], ["out"], name="context"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 16])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "T", 16])], inits)


def tiny_attention_feeds(count: int) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(i).normal(0, 1, (1, 6, 16)).astype(np.float32)} for i in range(count)]


def affine_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv blocks with channel-wise affine ops around their activation, as in PP-OCRv4's
    backbone; channel ranges differ by 30x:

    x -> Conv a -> Mul(k) -> Add(b) -> HardSwish -> Mul(c) -> Add(d) -> depthwise Conv b -> Relu
      -> Conv c (1x1) -> Sigmoid -> y        (k and c share one initializer)
    """
    rng = np.random.default_rng(seed)
    spread = np.geomspace(0.1, 3.0, 8)[:, None, None, None]
    inits = [
        _init("wa", rng.normal(0, 0.3, (8, 3, 3, 3)) * spread), _init("ba", rng.normal(0, 0.1, 8)),
        _init("gain", np.array([1.3])), _init("shift_b", np.array([0.6])),
        _init("shift_d", np.array([-0.2])),
        _init("wb", rng.normal(0, 0.3, (8, 1, 3, 3))), _init("bb", rng.normal(0, 0.1, 8)),
        _init("wc", rng.normal(0, 0.3, (4, 8, 1, 1))),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["gain", "a"], ["ak"], name="mul_k"),
        helper.make_node("Add", ["ak", "shift_b"], ["akb"], name="add_b"),
        helper.make_node("HardSwish", ["akb"], ["h"], name="hswish"),
        helper.make_node("Mul", ["h", "gain"], ["hc"], name="mul_c"),
        helper.make_node("Add", ["hc", "shift_d"], ["hcd"], name="add_d"),
        helper.make_node("Conv", ["hcd", "wb", "bb"], ["b"], name="conv_b", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Conv", ["rb", "wc"], ["c"], name="conv_c"),
        helper.make_node("Sigmoid", ["c"], ["y"], name="sigmoid"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12, 12])], inits)


def padded_cnn(mode: str = "constant", value: float | None = None, pool: str = "MaxPool",
               seed: int = 0) -> onnx.ModelProto:
    """TensorFlow-style "SAME" padding as separate Pads, as exporters write it:

    x -> Pad(0,0 | 1,2) -> Conv a -> Relu -> Pad(1,1 | 1,1) -> pool(3x3) -> Pad -> Conv b -> y

    The first and last Pads use `mode` and `value`; the pool's Pad is always zero constant
    (exact to fold into a MaxPool after the Relu, and into an AveragePool that counts pads).
    """
    rng = np.random.default_rng(seed)
    inits = [_init("wa", rng.normal(0, 0.3, (8, 3, 3, 3))), _init("ba", rng.normal(0, 0.1, 8)),
             _init("wb", rng.normal(0, 0.2, (6, 8, 3, 3))), _init("bb", rng.normal(0, 0.1, 6)),
             numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads_a"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads_p")]
    value_input = []
    if value is not None:
        inits.append(_init("pad_value", np.array(value)))
        value_input = ["pad_value"]
    pool_attrs = {"kernel_shape": [3, 3], "strides": [2, 2]}
    nodes = [
        helper.make_node("Pad", ["x", "pads_a", *value_input], ["xp"], name="pad_a", mode=mode),
        helper.make_node("Conv", ["xp", "wa", "ba"], ["a"], name="conv_a"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Pad", ["r", "pads_p"], ["rp"], name="pad_pool"),
        helper.make_node(pool, ["rp"], ["p"], name="pool", **pool_attrs),
        helper.make_node("Pad", ["p", "pads_a", *value_input], ["pp"], name="pad_b", mode=mode),
        helper.make_node("Conv", ["pp", "wb", "bb"], ["y"], name="conv_b", pads=[0, 1, 0, 1]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, None, None])],
                  inits, opset=18)


def swish_cnn(seed: int = 0) -> onnx.ModelProto:
    """PP-OCRv4's swish between two Convs: its sigmoid branch starts with a Mul by a constant,
    so the swish Mul has one quantized input (the Conv output) and one float (the sigmoid):

    x -> Conv a -> c -> Mul(c, sigmoid(c * k)) -> Conv b -> Relu -> y
    """
    rng = np.random.default_rng(seed)
    inits = [_init("wa", rng.normal(0, 0.3, (8, 3, 3, 3))), _init("ba", rng.normal(0, 0.1, 8)),
             _init("wb", rng.normal(0, 0.2, (6, 8, 3, 3))), _init("bb", rng.normal(0, 0.1, 6)),
             _init("k", np.array(1.5))]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["c"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "k"], ["ck"], name="scale"),
        helper.make_node("Sigmoid", ["ck"], ["s"], name="sigmoid"),
        helper.make_node("Mul", ["c", "s"], ["sw"], name="swish"),
        helper.make_node("Conv", ["sw", "wb", "bb"], ["cb"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["cb"], ["y"], name="relu"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 16, 16])], inits)


def hardswish_cnn(seed: int = 0, form: str = "clip", opset: int = 12,
                  shared: bool = False) -> onnx.ModelProto:
    """HardSwish written out between two Convs, as Paddle's exporter writes it:

    x -> Conv a -> c -> Mul(c, Clip(c + 3, 0, 6)) / 6 -> Conv b -> y       (form "clip")
    x -> Conv a -> c -> Mul(HardSigmoid(c, 1/6, 0.5), c) -> Conv b -> y    (form "hardsigmoid")

    `shared`: the Clip's output is a graph output too (then nothing may fuse).
    """
    rng = np.random.default_rng(seed)
    inits = [_init("wa", rng.normal(0, 0.5, (8, 3, 3, 3))), _init("ba", rng.normal(0, 0.3, 8)),
             _init("wb", rng.normal(0, 0.2, (6, 8, 1, 1))), _init("bb", rng.normal(0, 0.1, 6)),
             _init("three", np.array(3.0)), _init("zero", np.array(0.0)), _init("six", np.array(6.0))]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["c"], name="conv_a", pads=[1, 1, 1, 1])]
    if form == "clip":
        nodes += [helper.make_node("Add", ["c", "three"], ["c3"], name="plus3"),
                  helper.make_node("Clip", ["c3", "zero", "six"], ["gate"], name="clip"),
                  helper.make_node("Mul", ["c", "gate"], ["cg"], name="times"),
                  helper.make_node("Div", ["cg", "six"], ["h"], name="sixth")]
    else:
        nodes += [helper.make_node("HardSigmoid", ["c"], ["gate"], name="hsig", alpha=1 / 6, beta=0.5),
                  helper.make_node("Mul", ["gate", "c"], ["h"], name="times")]
    nodes.append(helper.make_node("Conv", ["h", "wb", "bb"], ["y"], name="conv_b"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 16, 16])]
    if shared:
        outputs.append(helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["N", 8, 16, 16]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                  outputs, inits, opset=opset)
