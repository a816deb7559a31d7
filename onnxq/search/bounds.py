"""How far the scale search may raise each activation scale without undoing an integer fusion.

ORT folds a Clip into the QuantizeLinear after it (its ClipQuantFusion rule) only while the Q's
representable range, scale * (qmin - zero_point) .. scale * (qmax - zero_point), lies inside the
Clip's [min, max], to float32 epsilon. Calibration gives a ReLU6's group the range [0, 6], so at
the base scale ORT drops the Clip and the Conv in front runs as QLinearConv with the ReLU6 in its
codes. A candidate that raises that scale by a few percent leaves DequantizeLinear -> Clip ->
QuantizeLinear in float: measured on EfficientNet-Lite0 W8A8, the search's accepted scales left
6 such islands in ORT's optimized graph (49 QLinearConv either way).

So a group whose Clips fold at its base scale gets a ceiling, the largest float32 scale at which
they all still fold; candidates are capped there (onnxq.search.worker.candidate_scales), and a
search never makes the written model run a float op the base model did not.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.numerics import IntRange
from onnxq.plan import QuantPlan
from onnxq.qparams import QParams

EPSILON = np.finfo(np.float32).eps  # ORT's tolerance in ClipQuantFusion


def fusion_ceilings(model: ir.Model, plan: QuantPlan, qparams: QParams) -> dict[str, np.float32]:
    """Group (by stats tensor) -> the largest scale at which every Clip whose output the group
    quantizes still folds into its QuantizeLinear; only groups whose Clips fold at their current
    scale (nothing to keep elsewhere)."""
    group_of = {tensor: group for group in plan.activation_groups for tensor in group.tensors}
    ceilings: dict[str, np.float32] = {}
    for node in model.graph:
        group = group_of.get(node.outputs[0].name) if node.op_type == "Clip" else None
        if group is None or group.stats_tensor not in qparams.activations:
            continue
        bounds = _clip_bounds(node)
        params = qparams.activations[group.stats_tensor]
        if bounds is None or not folds(params.scale, params.zero_point, group.grid, *bounds):
            continue
        ceiling = largest_folding_scale(params.scale, params.zero_point, group.grid, *bounds)
        ceilings[group.stats_tensor] = min(ceilings.get(group.stats_tensor, ceiling), ceiling)
    return ceilings


def folds(scale: float, zero_point: int, grid: IntRange, low: float, high: float) -> bool:
    """Whether ORT drops a Clip(low, high) in front of a QuantizeLinear with this scale and zero
    point (in float32, as ORT computes it)."""
    scale = np.float32(scale)
    lower = scale * np.float32(grid.qmin - zero_point)
    upper = scale * np.float32(grid.qmax - zero_point)
    return bool(np.float32(low) - lower <= EPSILON and upper - np.float32(high) <= EPSILON)


def largest_folding_scale(scale: float, zero_point: int, grid: IntRange, low: float,
                          high: float) -> np.float32:
    """The largest float32 scale >= `scale` (which folds) at which the Clip still folds."""
    limits = [high / (grid.qmax - zero_point)] if grid.qmax > zero_point and np.isfinite(high) else []
    if grid.qmin < zero_point and np.isfinite(low):
        limits.append(low / (grid.qmin - zero_point))
    if not limits:
        return np.float32(np.inf)
    ceiling = np.float32(max(min(limits), float(scale)))
    while not folds(ceiling, zero_point, grid, low, high):  # float32 rounding went past the bound
        ceiling = np.nextafter(ceiling, np.float32(0))
    return ceiling


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """A Clip's constant min and max (missing ones unbounded); None when either is computed."""
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            bounds.append(default)
        elif value.const_value is None:
            return None
        else:
            bounds.append(float(value.const_value.numpy()))
    return bounds[0], bounds[1]
