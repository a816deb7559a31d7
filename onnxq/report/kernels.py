"""Which kernels ONNX Runtime really runs: op counts of its optimized graph.

A QDQ graph only says what *could* run in integers; ORT fuses Q/DQ patterns into integer
kernels (QLinearConv, MatMulIntegerToFloat, QLinearAdd, ...) only where its selectors match.
Counting the op types of the graph ORT writes after optimization tells the truth.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
    "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "DynamicQuantizeMatMul", "MatMulNBits", "NhwcQLinearConv", "QLinearReduceMean",
})


def optimized_op_counts(model: onnx.ModelProto | bytes,
                        level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                        ) -> dict[str, int]:
    """Op type -> count in the graph ORT runs for this model on the CPU."""
    data = model if isinstance(model, bytes) else model.SerializeToString()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.optimized_model_filepath = str(path)
        options.log_severity_level = 3
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(path))
    return dict(collections.Counter(node.op_type for node in optimized.graph.node))


def integer_kernel_counts(counts: dict[str, int]) -> dict[str, int]:
    return {op: n for op, n in counts.items() if op in INTEGER_KERNELS}
