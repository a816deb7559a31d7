"""Which ops onnxq quantizes, and how: a table from op type to the roles of its inputs.

Three kinds of op take part in an integer chain:

- compute ops (Conv, ConvTranspose, Gemm, MatMul) have integer kernels in ONNX Runtime
  (QLinearConv, QGemm, QLinearMatMul / MatMulIntegerToFloat). Their activation inputs are
  always quantized; their constant weight is quantized per channel along `weight_axis`; a
  1-D bias becomes int32 with scale s_x * s_w. Conv-like ops also quantize their output,
  because ORT only fuses DQ -> Conv -> Q into QLinearConv with the Q there.
- chain ops (Relu, Clip, MaxPool, Reshape, Transpose, Pad, ...) move or clamp values without
  new ones: when their input is quantized and feeds only them, their output shares the input's
  scale and zero point, so ORT drops the Q/DQ pair around them and the chain stays integer
  (a Pad, which ORT has no selector for, is moved onto the codes by passes/integer_pad.py).
- Gather of a constant table (an embedding) is a compute op without activation inputs: its
  table is quantized per row (axis 0) and dequantized in front of the Gather; the gathered
  rows stay float.
- join ops (Add, Mul, Concat, pooling) have integer kernels (QLinearAdd, QLinearConcat, ...)
  and are quantized only when every activation input already is: residual joins of CNNs go
  integer, while a transformer's residual Adds and mask Add (whose inputs come from float ops)
  stay float, where int8 would destroy their range.

Every other op stays float.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import onnx_ir as ir


class OpKind(enum.Enum):
    COMPUTE = "compute"
    CHAIN = "chain"
    JOIN = "join"


@dataclass(frozen=True)
class OpRule:
    """How one op type is quantized."""

    kind: OpKind
    activation_inputs: tuple[int, ...] = (0,)
    weight_input: int | None = None
    bias_input: int | None = None
    quantize_output: bool = False


def gemm_weight_axis(node: ir.Node) -> int:
    """Gemm's B is (K, N) or, with transB, (N, K): output channels are axis 1 or 0."""
    trans_b = node.attributes.get("transB")
    return 0 if trans_b is not None and trans_b.as_int() else 1


def weight_axis(node: ir.Node) -> int:
    """The output-channel axis of a compute node's weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return gemm_weight_axis(node)
    if node.op_type == "Gather":
        return 0
    return -1  # MatMul: B is (..., K, N)


def reduction_axis(node: ir.Node, weight_input: int, shape: tuple[int, ...]) -> int | None:
    """The axis of a weight's grouped view (onnxq.numerics.grouped_shape) that its groups run
    along, the reduction (input) axis: MatMul B (K, N) -> 0; Gemm B -> 0, or 1 with transB; Conv
    (O, I, kh, kw) viewed as (O, I * kh * kw) -> 1; a Gather table (V, D) -> 1 (along each row).
    None where group-wise scales are not offered (ConvTranspose, MatMul weights of rank > 2)."""
    if node.op_type == "Conv" or (node.op_type == "Gather" and len(shape) == 2):
        return 1
    if node.op_type == "Gemm":
        return 1 - gemm_weight_axis(node)
    if node.op_type == "MatMul" and len(shape) == 2 and weight_input == 1:
        return 0
    return None


OP_RULES: dict[str, OpRule] = {
    "Conv": OpRule(OpKind.COMPUTE, (0,), weight_input=1, bias_input=2, quantize_output=True),
    "ConvTranspose": OpRule(OpKind.COMPUTE, (0,), weight_input=1, bias_input=2,
                            quantize_output=True),
    "Gemm": OpRule(OpKind.COMPUTE, (0,), weight_input=1, bias_input=2),
    # MatMul: input 1 is a weight when it is constant, else a second activation.
    "MatMul": OpRule(OpKind.COMPUTE, (0, 1), weight_input=1),
    # Gather: a constant table (input 0) is a weight when gathered along axis 0 (embeddings).
    "Gather": OpRule(OpKind.COMPUTE, (), weight_input=0),
    "Relu": OpRule(OpKind.CHAIN),
    "Clip": OpRule(OpKind.CHAIN),
    "MaxPool": OpRule(OpKind.CHAIN),
    "Reshape": OpRule(OpKind.CHAIN),
    "Transpose": OpRule(OpKind.CHAIN),
    "Flatten": OpRule(OpKind.CHAIN),
    "Squeeze": OpRule(OpKind.CHAIN),
    "Unsqueeze": OpRule(OpKind.CHAIN),
    "Identity": OpRule(OpKind.CHAIN),
    "Pad": OpRule(OpKind.CHAIN),  # runs on codes (passes/integer_pad.py) where it did not fold
    "Add": OpRule(OpKind.JOIN, (0, 1)),
    "Mul": OpRule(OpKind.JOIN, (0, 1)),
    "Concat": OpRule(OpKind.JOIN, ()),  # all inputs: variadic
    "GlobalAveragePool": OpRule(OpKind.JOIN, (0,)),
    "AveragePool": OpRule(OpKind.JOIN, (0,)),
}


def rule_for(node: ir.Node) -> OpRule | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    return OP_RULES.get(node.op_type)


def activation_input_indices(node: ir.Node, rule: OpRule) -> tuple[int, ...]:
    """Indices of the inputs that carry activations (variadic ops: all present inputs)."""
    if rule.kind is OpKind.JOIN and not rule.activation_inputs:
        return tuple(range(len(node.inputs)))
    return rule.activation_inputs
