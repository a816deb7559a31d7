"""Give the layers of `plan.float_activations` their input in float (weight-only layers).

InsertQDQPass puts a Q -> DQ pair on every tensor of a quantized activation group, for all
its readers. A layer whose activations stay float (the auto choice where a layer's input
rounding costs more than its integer kernel saves) is rewired to the float tensor in front of
that pair:

    x -> Q -> DQ -> Conv(DQ(W_q))        becomes        x -> Conv(DQ(W_q))

Its weight keeps its codes (DequantizeLinear, or MatMulNBits reading float activations, which
ORT runs as its 4-bit kernel), so the file is no larger; ORT runs the float op. A pair no
other layer reads is removed with the unused nodes.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq.passes.insert_qdq import before_qdq

logger = logging.getLogger(__name__)


class FloatActivationsPass(ir.passes.InPlacePass):
    """Rewire each named layer's quantized inputs to the float tensors in front of them."""

    def __init__(self, layers: dict[str, str]) -> None:
        super().__init__()
        self.layers = layers

    def requires(self, model: ir.Model) -> None:
        names = {node.name for node in model.graph}
        missing = sorted(set(self.layers) - names)
        if missing:
            raise ValueError(f"layers with float activations not in the graph: {', '.join(missing)}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.name not in self.layers:
                continue
            for index, value in enumerate(node.inputs):
                source = None if value is None else before_qdq(value)
                if source is not None and source is not value:
                    node.replace_input_with(index, source)
                    modified = True
            logger.debug("layer %s: float activations (%s)", node.name, self.layers[node.name])
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)
