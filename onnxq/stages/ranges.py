"""Activation ranges: streamed statistics of every activation group's tensor during the
calibration pass, then scale and zero point by the configured method (onnxq.calibration)."""

from __future__ import annotations

from onnxq.calibration import calibrate
from onnxq.calibration.statistics import TensorStatistics
from onnxq.state import Observers, QuantState


class ActivationRanges:
    name = "ranges"

    def __init__(self) -> None:
        self._stats: dict[str, TensorStatistics] = {}

    def observe(self, state: QuantState) -> Observers:
        keep_histogram = calibrate.needs_histogram(state.config.method)
        self._stats = {name: TensorStatistics(keep_histogram=keep_histogram)
                       for name in state.plan.stats_tensors}
        return {name: [stats] for name, stats in self._stats.items()}

    def run(self, state: QuantState) -> None:
        state.qparams.activations = calibrate.activation_qparams(state.plan, self._stats, state.config)
