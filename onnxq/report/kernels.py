"""Which kernels ONNX Runtime really runs: op counts of its optimized graph.

A QDQ graph only says what *could* run in integers; ORT fuses Q/DQ patterns into integer
kernels (QLinearConv, MatMulIntegerToFloat, QLinearAdd, ...) only where its selectors match.
Counting the op types of the graph ORT writes after optimization tells the truth.

`INTEGER_KERNELS` names ONNX and com.microsoft ops that compute on quantized values (integer
codes, or packed low-bit weights as MatMulNBits and its fusions); every name is one of ORT's
registered operator schemas (checked against onnxruntime 1.32).
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxq.scoring.sessions import SessionSettings, open_session

INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
    "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearReduceMean", "QLinearWhere", "QAttention", "QEmbedLayerNormalization",
    "DynamicQuantizeMatMul", "GatherBlockQuantized",
    "MatMulNBits", "MatMulNBitsMlp", "MatMulNBitsQkv", "MatMulNBitsQLoRA",
})


def optimized_op_counts(model: onnx.ModelProto | bytes,
                        level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                        ) -> dict[str, int]:
    """Op type -> count in the graph ORT runs for this model on the CPU."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "optimized.onnx"
        open_session(model, "the model", SessionSettings(optimization=level), optimized_model_path=path)
        optimized = onnx.load(str(path))
    return dict(collections.Counter(node.op_type for node in optimized.graph.node))


def integer_kernel_counts(counts: dict[str, int]) -> dict[str, int]:
    return {op: n for op, n in counts.items() if op in INTEGER_KERNELS}
