"""One index of a prepared model's nodes by name, built once per run and shared by every stage.

The plan names layers by node name (labels, never data); stages that need the node behind a
name look it up here instead of rebuilding a `{name: node}` map each time. Node objects are
stable from `prepare` to `emit` (SmoothQuant rewrites initializer values, not nodes; `emit`
works on a copy).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


class ModelIndex:
    """The prepared model and its nodes by name."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.nodes: dict[str, ir.Node] = {node.name: node for node in model.graph}

    def node(self, name: str) -> ir.Node:
        return self.nodes[name]

    def constant(self, layer: str, input_index: int) -> np.ndarray:
        """The constant value of input `input_index` of node `layer` (a weight or a bias)."""
        return self.nodes[layer].inputs[input_index].const_value.numpy()
