"""Bias correction as a stage: the input means of Conv and Gemm layers are streamed during the
calibration pass; each corrected bias is b - (W_q - W) E[x] (onnxq.calibration.bias_correction).

`BiasCorrector` is kept on the state so that the bit allocator can correct a layer's bias for
any candidate weight before this stage corrects the final plan's.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxq import numerics
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

    def for_layer(self, weight_spec: WeightQuant, params: WeightParams,
                  quantized_input_mean: np.ndarray | None = None) -> np.ndarray | None:
        """The corrected bias of `weight_spec`'s layer with these weight parameters (None when
        the layer has no correctable bias): b - (W_q - W) E[x]. Given the layer's mean input in
        the quantized model, E[x_q], the bias also absorbs that mean's shift from the float
        model's: b - (W_q E[x_q] - W E[x]) = b - (W_q - W) E[x_q] - W (E[x_q] - E[x])."""
        spec = self.by_layer.get(weight_spec.node)
        if spec is None:
            return None
        node = self._index.node(spec.node)
        weight = node.inputs[weight_spec.input_index].const_value.numpy()
        error = params.dequantized(weight_spec.axis) - weight
        mean = self.input_means[spec.activation].mean
        if quantized_input_mean is None:
            shift = _output_shift(node, error, mean)
        else:
            shift = (_output_shift(node, error, quantized_input_mean)
                     + _output_shift(node, weight, quantized_input_mean - mean))
        return corrected_bias(node.inputs[spec.input_index].const_value.numpy(), shift)

    def corrected(self, plan: QuantPlan,
                  weights: Mapping[WeightQuant, WeightParams]) -> dict[BiasQuant, np.ndarray]:
        """b - (W_q - W) E[x] for every correctable bias, with the plan's weight parameters."""
        weight_specs = {spec.node: spec for spec in plan.weights}
        return {spec: self.for_layer(weight_specs[spec.node], weights[weight_specs[spec.node]])
                for spec in self.correctable}


def _output_shift(node: ir.Node, weight: np.ndarray, input_mean: np.ndarray) -> np.ndarray:
    """The mean output of a Conv or Gemm weight (no bias) on inputs of this channel mean."""
    if node.op_type == "Conv":
        group = node.attributes["group"].as_int() if "group" in node.attributes else 1
        return conv_output_shift(weight, input_mean, group)
    return gemm_output_shift(weight, input_mean, trans_b=gemm_weight_axis(node) == 0)


class BiasCorrection:
    name = "bias"

    def observe(self, state: QuantState) -> Observers:
        enabled = state.config.bias_correction and len(state.calibration) > 0  # E[x] needs data
        state.biases = BiasCorrector(state.index, state.plan, enabled)
        return state.biases.observers()

    def run(self, state: QuantState) -> None:
        state.qparams.bias_values = state.biases.corrected(state.plan, state.qparams.weights)
        if fit_weight_scales_to_biases(state):  # the weights moved: correct their biases again
            state.qparams.bias_values = state.biases.corrected(state.plan, state.qparams.weights)


# A bias is stored as int32 codes at scale s_x * s_w. A dead output channel (weights ~0) gets a
# tiny s_w, and its bias, however small, overflows int32 and is clipped: the channel's constant
# output is lost. Such a channel's s_w is raised until its bias fits with this much room (a
# scale search may still shrink s_x), and its codes are re-rounded at that scale.
BIAS_HEADROOM = 16.0


def float_bias(state: QuantState, spec: BiasQuant) -> np.ndarray:
    """The bias the emitter rounds to int32: corrected where bias correction ran, else the
    model's own."""
    bias = state.qparams.bias_values.get(spec)
    if bias is None:
        bias = state.model.graph.initializers[spec.tensor].const_value.numpy()
    return np.asarray(bias)


def fit_weight_scales_to_biases(state: QuantState) -> bool:
    """Raise the weight scales of channels whose bias would overflow int32; True if any did."""
    limit = numerics.INT32.qmax / BIAS_HEADROOM
    changed = False
    for spec in state.plan.biases:
        weight_spec = state.plan.weight_of(spec.node)
        params = state.qparams.weights.get(weight_spec) if weight_spec is not None else None
        if params is None or params.scale.ndim > 1 or spec.node in state.plan.dynamic_layers:
            continue  # a dynamic layer's bias stays float
        group = state.plan.group_of(spec.activation).stats_tensor
        input_scale = float(state.qparams.activations[group].scale)
        needed = np.abs(float_bias(state, spec).astype(np.float64)).reshape(-1) / (input_scale * limit)
        scale = np.broadcast_to(params.scale.astype(np.float64), needed.shape)
        low = needed > scale
        if not low.any():
            continue
        weight = state.index.node(spec.node).inputs[weight_spec.input_index].const_value.numpy()
        state.qparams.weights[weight_spec] = _raised(params, weight, weight_spec,
                                                     np.where(low, needed, scale))
        changed = True
    return changed


def _raised(params: WeightParams, weight: np.ndarray, spec: WeightQuant,
            scale: np.ndarray) -> WeightParams:
    """`params` with `scale` (per channel), the codes of the channels whose scale rose re-rounded."""
    new_scale = scale.astype(np.float32).reshape(params.scale.shape) if params.scale.ndim else \
        np.float32(scale.max())
    rounded = numerics.quantize(weight, new_scale, params.zero_point, spec.grid, spec.axis)
    raised = np.asarray(new_scale != params.scale)
    if spec.axis is not None and raised.ndim:
        shape = [1] * weight.ndim
        shape[spec.axis] = -1
        raised = raised.reshape(shape)
    codes = np.where(raised, rounded, params.codes).astype(params.codes.dtype)
    return WeightParams(scale=np.asarray(new_scale, np.float32), zero_point=params.zero_point, codes=codes)
