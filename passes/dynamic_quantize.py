"""Dynamic activation quantization: a weight layer quantizes its input per batch at run time.

For every layer of `plan.dynamic_layers` (MatMul or Gemm with a constant 2-D float weight):

    x -> MatMul(W)              becomes
    x -> DynamicQuantizeLinear -> (x_q, s_x, z_x)
         MatMulInteger(x_q, W_q, z_x[, z_w]) -> Cast(float) -> Mul(s_x * s_w) [-> Add(beta * C)] -> y

W_q are the searcher's int8 codes (per channel or per tensor, never re-rounded here), in the
(K, N) layout MatMulInteger reads (a Gemm's transposed B is transposed back); s_w its scales
(a Gemm's alpha folded in); z_w only where some zero point is not 0. DynamicQuantizeLinear
gives uint8 codes of [min(x, 0), max(x, 0)] for each run:

    s_x = (max(x, 0) - min(x, 0)) / 255,   z_x = round(-min(x, 0) / s_x),
    x_q = clip(round(x / s_x) + z_x, 0, 255)

so y = s_x s_w (x_q - z_x)(W_q - z_w) is exactly the integer product, scaled. ONNX Runtime
(checked on 1.32, CPU) fuses DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul [-> Add]
into DynamicQuantizeMatMul, one integer kernel, when the DynamicQuantizeLinear feeds that one
MatMulInteger: each layer gets its own, even where several read the same x (Q, K and V
projections). Two forms it does NOT fuse, and why this one is written instead:
DynamicQuantizeLinear -> DequantizeLinear -> MatMul on a 2-D input with a bias Add (ORT's
MatMul + Add fusion makes a float Gemm of it first), and any QDQ Gemm with a run-time scale.

Saturation: x86 CPUs without VNNI (AVX2) add pairs of u8 x s8 products in int16 and saturate,
which is why static layers keep 7-bit weight codes there (`QuantConfig.reduce_range`). A dynamic
layer keeps full-range 8-bit codes instead and, on such a CPU (`unsigned_weights`), stores them
as uint8, code + 128 with zero point 128: ORT's u8 x u8 kernels widen to 16 bits before adding
and cannot saturate. Same values, one bit more than 7-bit codes: MiniLM-L6 dynamic, mean cosine
to float on its evaluation sentences 0.9955 with 7-bit int8 codes, 0.9970 with full-range uint8
(AVX2 EPYC, ORT 1.32).

Convs stay out: ORT 1.32's CPU ConvInteger loads and runs with int8 weights, but it is not fused
(ConvInteger, Cast, Mul, Add), and on an AVX2 EPYC a 3x3 Conv of 64 -> 128 channels at 28 x 28
ran in 12.8 ms against 3.6 ms float and 3.1 ms as a static QLinearConv (1 thread).

A tensor that also feeds static layers carries their Q -> DQ pair (InsertQDQPass runs first):
the dynamic layer reads the float tensor in front of it. Codes of fewer than 8 bits are stored
in int8 all the same (MatMulInteger takes 8-bit operands).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxq.passes.insert_qdq import before_qdq
from onnxq.plan import QuantPlan, WeightQuant
from onnxq.qparams import QParams, WeightParams

logger = logging.getLogger(__name__)

DYNAMIC_OPS = ("MatMul", "Gemm")


def _attribute(node: ir.Node, name: str, default: float) -> float:
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def dynamic_capable(node: ir.Node) -> str | None:
    """Why `node` cannot take dynamic activations, or None when it can."""
    if node.op_type not in DYNAMIC_OPS or node.domain not in ("", "ai.onnx"):
        return f"{node.op_type} has no dynamic integer kernel (MatMul and Gemm have)"
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return "its weight is not a constant 2-D tensor"
    if weight.const_value.dtype != ir.DataType.FLOAT:
        return "its weight is not float32"
    if node.inputs[0] is None or node.inputs[0].const_value is not None:
        return "its first operand is a constant"
    if node.op_type == "Gemm":
        if _attribute(node, "transA", 0):
            return "Gemm with transA"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and bias.const_value is None:
            return "Gemm with a bias that is not a constant"
    return None


@dataclass(frozen=True)
class _Weights:
    """A layer's codes (K, N), scales and zero points (None: all 0; a scalar: one for the
    tensor) as MatMulInteger and the Mul read them."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bias: np.ndarray | None


def _matmul_weights(node: ir.Node, spec: WeightQuant, params: WeightParams,
                    bias: np.ndarray | None, unsigned: bool) -> _Weights:
    """MatMul's B is (K, N) already; a Gemm's B is transposed back when transB, alpha folds into
    the scales and beta into the bias (`bias`: a corrected one, else the node's C)."""
    codes, scale, zero_point = params.codes, np.asarray(params.scale, np.float32), params.zero_point
    if node.op_type == "Gemm":
        if _attribute(node, "transB", 0):
            codes = codes.T
        scale = scale * np.float32(_attribute(node, "alpha", 1.0))
        if bias is None and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = node.inputs[2].const_value.numpy()
        if bias is not None:
            bias = bias * np.float32(_attribute(node, "beta", 1.0))
    codes = np.ascontiguousarray(codes).astype(np.int16)
    zero_point = np.asarray(zero_point, np.int16).reshape(-1)
    if unsigned:
        codes, zero_point = codes + 128, zero_point + 128
    if np.all(zero_point == zero_point[0]):
        zero_point = zero_point[0]  # one for the whole tensor
    dtype = np.uint8 if unsigned else np.int8
    return _Weights(codes.astype(dtype), scale.reshape(-1),
                    np.asarray(zero_point, dtype) if np.any(zero_point) else None,
                    None if bias is None else bias.astype(np.float32))


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


class DynamicQuantizePass(ir.passes.InPlacePass):
    """Rewrite each dynamic layer of `plan` into the integer form above with `qparams`' codes."""

    def __init__(self, plan: QuantPlan, qparams: QParams, unsigned_weights: bool = False) -> None:
        super().__init__()
        self.plan = plan
        self.qparams = qparams
        self.unsigned_weights = unsigned_weights

    def requires(self, model: ir.Model) -> None:
        nodes = {node.name: node for node in model.graph}
        for name in self.plan.dynamic_layers:
            node = nodes.get(name)
            why = "no such node" if node is None else dynamic_capable(node)
            if why is not None:
                raise ValueError(f"layer {name} cannot take dynamic activations: {why}")
            if self.plan.weight_of(name) not in self.qparams.weights:
                raise ValueError(f"layer {name} has no weight parameters")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = {node.name: node for node in model.graph}
        corrected = {spec.node: value for spec, value in self.qparams.bias_values.items()}
        for name in self.plan.dynamic_layers:
            spec = self.plan.weight_of(name)
            weights = _matmul_weights(nodes[name], spec, self.qparams.weights[spec], corrected.get(name),
                                      self.unsigned_weights)
            self._rewrite(model.graph, nodes[name], weights, spec.tensor)
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.plan.dynamic_layers))

    @staticmethod
    def _rewrite(graph: ir.Graph, node: ir.Node, weights: _Weights, stem: str) -> None:
        name = node.name
        stem = f"{stem}_{name}" if f"{stem}_q" in graph.initializers else stem

        def make(op_type: str, inputs: list, suffix: str, outputs: int = 1, **attributes) -> ir.Node:
            values = [ir.Value(name=f"{name}_{suffix}{i or ''}") for i in range(outputs)]
            return ir.node(op_type, inputs, attributes or None, name=f"{name}_{suffix}", outputs=values)

        quantize = make("DynamicQuantizeLinear", [before_qdq(node.inputs[0])], "x_q", outputs=3)
        x_q, x_scale, x_zero = quantize.outputs
        operands = [x_q, _initializer(graph, f"{stem}_q", weights.codes), x_zero]
        if weights.zero_point is not None:
            operands.append(_initializer(graph, f"{stem}_zp", weights.zero_point))
        matmul = make("MatMulInteger", operands, "int")
        matmul.name = name  # the layer keeps its name: reports find it by name
        cast = make("Cast", matmul.outputs, "acc", to=ir.DataType.FLOAT)
        scale = make("Mul", [x_scale, _initializer(graph, f"{stem}_s", weights.scale)], "scale")
        new_nodes = [quantize, matmul, cast, scale,
                     make("Mul", [cast.outputs[0], scale.outputs[0]], "rescale")]
        if weights.bias is not None:
            bias = _initializer(graph, f"{stem}_bias", weights.bias)
            new_nodes.append(make("Add", [new_nodes[-1].outputs[0], bias], "bias"))
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, node.outputs,
                                                new_nodes[-1].outputs)
        logger.debug("layer %s: dynamic activations (%s)", name, node.op_type)
