"""Collect activation statistics by running ONNX Runtime over calibration feeds.

The float model is run with the tensors the plan needs exposed as extra graph outputs; each
feed's values are streamed into one `TensorStatistics` per tensor and dropped, so memory does
not grow with the number of feeds (or depend on their shapes). Ranges then come from the
statistics by the configured method (onnxq.calibration.ranges), and become per-tensor scales/zero points.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from onnxq.calibration.ranges import compute_range
from onnxq.calibration.statistics import TensorStatistics
from onnxq.config import CalibrationMethod, QuantConfig
from onnxq.data import Feed
from onnxq.plan import QuantPlan
from onnxq.qparams import ActivationParams, activation_params
from onnxq.scoring.sessions import SessionSettings, open_session

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


class Observer(Protocol):
    """Anything that streams a tensor's values: statistics, channel means, Gram matrices."""

    def update(self, x: np.ndarray) -> None: ...


def observe(proto: onnx.ModelProto, observers: Mapping[str, Sequence[Observer]],
            feeds: Iterable[Feed], progress: Progress | None = None,
            settings: SessionSettings | None = None) -> None:
    """Run the float model once per feed and hand each watched tensor to its observers."""
    names = [name for name, watching in observers.items() if watching]
    if not names:
        return
    session = open_session(expose_tensors(proto, names), "the calibration model", settings)
    for feed in feeds:
        for name, array in zip(names, session.run(names, feed), strict=True):
            for observer in observers[name]:
                observer.update(array)
        if progress is not None:
            progress(1)


class ChannelAbsMax:
    """Streamed max |x| per channel on `axis` (last: SmoothQuant's MatMul inputs; 1: the
    channels of an NCHW activation, for equalization)."""

    def __init__(self, axis: int = -1) -> None:
        self.axis = axis
        self.value: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        moved = np.moveaxis(x, self.axis, -1)
        channels = np.abs(moved.reshape(-1, moved.shape[-1])).max(axis=0)
        self.value = channels if self.value is None else np.maximum(self.value, channels)


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
