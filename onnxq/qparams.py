"""Quantization parameters: the numbers calibration and search choose, and emit writes.

Kept apart from the plan (which decides *what* is quantized) so that searchers can propose
new parameters for a fixed plan. Weights carry their integer codes: the emitter writes the
codes a searcher chose, never re-rounding them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxq import numerics
from onnxq.plan import ActivationGroup, BiasQuant, QuantPlan, WeightQuant


@dataclass(frozen=True)
class ActivationParams:
    """Per-tensor scale and zero point of an activation group, and the range they came from."""

    scale: np.float32
    zero_point: int
    lo: float
    hi: float


@dataclass(frozen=True)
class WeightParams:
    """Scales (per channel or scalar), zero points and the integer codes of one weight.

    Group-wise (`group_size` > 0): scale and zero point per group, in the blocked layout of the
    weight's grouped view along `block_axis` (onnxq.numerics); codes keep the weight's shape."""

    scale: np.ndarray
    zero_point: np.ndarray
    codes: np.ndarray
    group_size: int = 0
    block_axis: int | None = None

    def dequantized(self, axis: int | None) -> np.ndarray:
        if self.group_size:
            return numerics.dequantize_groups(self.codes, self.scale, self.zero_point,
                                              self.block_axis, self.group_size)
        return numerics.dequantize(self.codes, self.scale, self.zero_point, axis)

    def channel_scales(self) -> np.ndarray:
        """One scale per output channel: the scale itself, or a grouped weight's largest group
        scale per channel (what an int32 bias is quantized with)."""
        if not self.group_size:
            return self.scale
        return self.scale.max(axis=self.block_axis).astype(np.float32)


@dataclass
class QParams:
    """All parameters of a plan: activation groups keyed by their stats tensor; weights by the
    plan's `WeightQuant`; corrected biases by the plan's `BiasQuant`."""

    activations: dict[str, ActivationParams] = field(default_factory=dict)
    weights: dict[WeightQuant, WeightParams] = field(default_factory=dict)
    # Float bias values to quantize in place of the model's (bias correction).
    bias_values: dict[BiasQuant, np.ndarray] = field(default_factory=dict)


def round_to_nearest_weight(weight: np.ndarray, spec: WeightQuant) -> WeightParams:
    """Symmetric min-max scales and round-to-nearest codes for one weight (per group when the
    spec has groups)."""
    if spec.group_size:
        group, axis = spec.group_size, spec.block_axis
        scale = numerics.symmetric_group_scales(weight, spec.grid, axis, group)
        zero_point = np.zeros(scale.shape, dtype=spec.grid.dtype)
        codes = numerics.quantize_groups(weight, scale, zero_point, spec.grid, axis, group)
        return WeightParams(scale, zero_point, codes, group, axis)
    scale = numerics.symmetric_weight_scales(weight, spec.grid, spec.axis)
    zero_point = np.zeros(scale.shape, dtype=spec.grid.dtype)
    codes = numerics.quantize(weight, scale, zero_point, spec.grid, spec.axis)
    return WeightParams(scale, zero_point, codes)


def activation_params(lo: float, hi: float, plan_group: ActivationGroup) -> ActivationParams:
    """Scale / zero point for a group's clipping range.

    A symmetric group whose values are never negative (after Relu / Clip at 0) uses the whole
    grid from zero up (zero point at qmin): twice the resolution, and ORT can then drop the
    Relu / Clip in front of the Q.
    """
    symmetric = plan_group.symmetric and lo < 0
    make = numerics.symmetric_params if symmetric else numerics.asymmetric_params
    scale, zero_point = make(lo, hi, plan_group.grid)
    return ActivationParams(scale, zero_point, float(lo), float(hi))


def weight_params_for(plan: QuantPlan, weights: dict[str, np.ndarray]) -> dict[WeightQuant, WeightParams]:
    """Round-to-nearest parameters for every weight of a plan."""
    return {spec: round_to_nearest_weight(weights[spec.tensor], spec) for spec in plan.weights}
