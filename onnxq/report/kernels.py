"""Which kernels ONNX Runtime really runs: op counts of its optimized graph.

A QDQ graph only says what *could* run in integers; ORT fuses Q/DQ patterns into integer
kernels (QLinearConv, MatMulIntegerToFloat, QLinearAdd, ...) only where its selectors match.
Counting the op types of the graph ORT writes after optimization tells the truth.

A float island is what a fusion missed: a float op between a DequantizeLinear of an
activation and a QuantizeLinear,

    ... -> DequantizeLinear -> op (float) -> QuantizeLinear -> ...

(a Pad in front of a Conv, a Mul with one float input, ...). Each costs a dequantize, a float
kernel and a quantize where ORT could have run the op on codes or dropped it; `float_islands`
lists them (op type and node name) from the same optimized graph.

`INTEGER_KERNELS` names ONNX and com.microsoft ops that compute on quantized values (integer
codes, or packed low-bit weights as MatMulNBits and its fusions); every name is one of ORT's
registered operator schemas (checked against onnxruntime 1.32).
"""

from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass
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


def optimized_graph(model: onnx.ModelProto | bytes,
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    ) -> onnx.GraphProto:
    """The graph ORT runs for this model on the CPU, after its optimizations."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "optimized.onnx"
        open_session(model, "the model", SessionSettings(optimization=level), optimized_model_path=path)
        return onnx.load(str(path)).graph


def op_counts(graph: onnx.GraphProto) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in graph.node))


def optimized_op_counts(model: onnx.ModelProto | bytes,
                        level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                        ) -> dict[str, int]:
    """Op type -> count in the graph ORT runs for this model on the CPU."""
    return op_counts(optimized_graph(model, level))


@dataclass(frozen=True)
class FloatIsland:
    """A float op that reads a dequantized activation and feeds a QuantizeLinear."""

    op_type: str
    node: str

    def __str__(self) -> str:
        return f"{self.op_type} {self.node}"


def float_islands(graph: onnx.GraphProto) -> list[FloatIsland]:
    """The float islands of an (optimized) graph, in graph order (module docstring). A
    DequantizeLinear of a constant (a weight) does not count: only activations' codes."""
    constants = {tensor.name for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    quantized_inputs = {name for name, node in producers.items()
                        if node.op_type == "DequantizeLinear" and node.input[0] not in constants}
    quantize_reads = {node.input[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    return [FloatIsland(node.op_type, node.name) for node in graph.node
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and quantized_inputs.intersection(node.input) and quantize_reads.intersection(node.output)]


def island_counts(islands: list[FloatIsland]) -> dict[str, int]:
    """Op type -> number of float islands."""
    return dict(collections.Counter(island.op_type for island in islands))


def integer_kernel_counts(counts: dict[str, int]) -> dict[str, int]:
    return {op: n for op, n in counts.items() if op in INTEGER_KERNELS}
