"""Bias correction as a stage: the input means of Conv and Gemm layers are streamed during the
calibration pass; each corrected bias is b - (W_q - W) E[x] (onnxq.calibration.bias_correction).

`BiasCorrector` is kept on the state so that the bit allocator can correct a layer's bias for
any candidate weight before this stage corrects the final plan's.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from onnxq.calibration.bias_correction import (
    RunningChannelMean,
    conv_output_shift,
    corrected_bias,
    gemm_output_shift,
)
from onnxq.index import ModelIndex
from onnxq.passes.op_table import gemm_weight_axis
from onnxq.plan import BiasQuant, QuantPlan, WeightQuant
from onnxq.qparams import WeightParams
from onnxq.state import Observers, QuantState


class BiasCorrector:
    """The correctable biases of a plan (Conv and Gemm; none when disabled), their layers'
    input means, and the corrected values for given weight parameters."""

    def __init__(self, index: ModelIndex, plan: QuantPlan, enabled: bool) -> None:
        self._index = index
        # Channel axis of each layer's input: 1 for an NCHW Conv input, last for a Gemm's (N, K).
        self.correctable = {spec: (1 if index.node(spec.node).op_type == "Conv" else -1)
                            for spec in plan.biases if enabled
                            and index.node(spec.node).op_type in ("Conv", "Gemm")}
        self.by_layer = {spec.node: spec for spec in self.correctable}
        self.input_means = {spec.activation: RunningChannelMean(axis)
                            for spec, axis in self.correctable.items()}

    def observers(self) -> Observers:
        return {tensor: [mean] for tensor, mean in self.input_means.items()}

    def for_layer(self, weight_spec: WeightQuant, params: WeightParams) -> np.ndarray | None:
        """The corrected bias of `weight_spec`'s layer with these weight parameters (None when
        the layer has no correctable bias)."""
        spec = self.by_layer.get(weight_spec.node)
        if spec is None:
            return None
        node = self._index.node(spec.node)
        weight = node.inputs[weight_spec.input_index].const_value.numpy()
        error = params.dequantized(weight_spec.axis) - weight
        mean = self.input_means[spec.activation].mean
        if node.op_type == "Conv":
            group = node.attributes["group"].as_int() if "group" in node.attributes else 1
            shift = conv_output_shift(error, mean, group)
        else:
            shift = gemm_output_shift(error, mean, trans_b=gemm_weight_axis(node) == 0)
        return corrected_bias(node.inputs[spec.input_index].const_value.numpy(), shift)

    def corrected(self, plan: QuantPlan,
                  weights: Mapping[WeightQuant, WeightParams]) -> dict[BiasQuant, np.ndarray]:
        """b - (W_q - W) E[x] for every correctable bias, with the plan's weight parameters."""
        weight_specs = {spec.node: spec for spec in plan.weights}
        return {spec: self.for_layer(weight_specs[spec.node], weights[weight_specs[spec.node]])
                for spec in self.correctable}


class BiasCorrection:
    name = "bias"

    def observe(self, state: QuantState) -> Observers:
        state.biases = BiasCorrector(state.index, state.plan, state.config.bias_correction)
        return state.biases.observers()

    def run(self, state: QuantState) -> None:
        state.qparams.bias_values = state.biases.corrected(state.plan, state.qparams.weights)
