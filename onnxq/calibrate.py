"""Collect activation statistics by running ONNX Runtime over calibration feeds.

The float model is run with the tensors the plan needs exposed as extra graph outputs; each
feed's values are streamed into one `TensorStatistics` per tensor and dropped, so memory does
not grow with the number of feeds (or depend on their shapes). Ranges then come from the
statistics by the configured method (onnxq.ranges), and become per-tensor scales/zero points.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from onnxq.bias_correction import RunningChannelMean
from onnxq.config import CalibrationMethod, QuantConfig
from onnxq.data import Feed
from onnxq.model_io import create_session
from onnxq.plan import QuantPlan
from onnxq.qparams import ActivationParams, activation_params
from onnxq.ranges import compute_range
from onnxq.statistics import TensorStatistics

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]


def expose_tensors(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the model with `names` added as float graph outputs."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.append(
                helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return exposed


def collect_statistics(
    proto: onnx.ModelProto,
    tensors: Sequence[str],
    feeds: Iterable[Feed],
    keep_histogram: bool,
    progress: Progress | None = None,
    channel_axes: Mapping[str, int] | None = None,
) -> tuple[dict[str, TensorStatistics], dict[str, RunningChannelMean]]:
    """Stream every feed through the float model into per-tensor statistics and, for the
    tensors of `channel_axes`, per-channel means (for bias correction)."""
    channel_axes = channel_axes or {}
    names = list(dict.fromkeys([*tensors, *channel_axes]))
    stats = {name: TensorStatistics(keep_histogram=keep_histogram) for name in tensors}
    means = {name: RunningChannelMean(axis) for name, axis in channel_axes.items()}
    if not names:
        return stats, means
    session = create_session(expose_tensors(proto, names), "the calibration model")
    for feed in feeds:
        for name, array in zip(names, session.run(names, feed), strict=True):
            if name in stats:
                stats[name].update(array)
            if name in means:
                means[name].update(array)
        if progress is not None:
            progress(1)
    return stats, means


def collect_channel_absmax(proto: onnx.ModelProto, tensors: Sequence[str], feeds: Iterable[Feed],
                           progress: Progress | None = None) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor, over all feeds (for SmoothQuant)."""
    names = list(dict.fromkeys(tensors))
    absmax: dict[str, np.ndarray] = {}
    if not names:
        return absmax
    session = create_session(expose_tensors(proto, names), "the calibration model")
    for feed in feeds:
        for name, array in zip(names, session.run(names, feed), strict=True):
            channels = np.abs(array.reshape(-1, array.shape[-1])).max(axis=0)
            absmax[name] = channels if name not in absmax else np.maximum(absmax[name], channels)
        if progress is not None:
            progress(1)
    return absmax


def activation_qparams(plan: QuantPlan, stats: dict[str, TensorStatistics],
                       config: QuantConfig) -> dict[str, ActivationParams]:
    """Scale and zero point of every activation group from its statistics."""
    params = {}
    for group in plan.activation_groups:
        tensor_stats = stats[group.stats_tensor]
        if tensor_stats.nonfinite_count:
            logger.warning("%s: %d non-finite values left out of its range", group.stats_tensor,
                           tensor_stats.nonfinite_count)
        lo, hi = compute_range(config.method.value, tensor_stats,
                               num_levels=group.grid.qmax - group.grid.qmin,
                               symmetric=group.symmetric, percentile=config.percentile)
        params[group.stats_tensor] = activation_params(lo, hi, group)
    return params


def needs_histogram(method: CalibrationMethod) -> bool:
    return method is not CalibrationMethod.MINMAX
