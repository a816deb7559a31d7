"""Collect activation statistics by running ONNX Runtime over calibration feeds.

The float model is run with the tensors the plan needs exposed as extra graph outputs; each
feed's values are streamed into one `TensorStatistics` per tensor and dropped, so memory does
not grow with the number of feeds (or depend on their shapes). Nor with the model's size: an
onnx-ir model is exposed on a shallow clone (the weights are shared, not copied), and a model
that goes to ORT through external data (past 2 GB, or weights mapped from files) is opened
without ORT's weight prepacking (a packed copy of every MatMul weight, made for speed over many
runs: a calibration pass is a few runs, and the copy doubles the model). Smaller models keep it:
packed and unpacked MLAS kernels differ in the last bits, and their statistics stay as they were.
Ranges then come from the statistics by the configured method (onnxq.calibration.ranges), and
become per-tensor scales/zero points.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq.calibration.ranges import compute_range
from onnxq.calibration.statistics import TensorStatistics
from onnxq.config import CalibrationMethod, QuantConfig
from onnxq.data import Feed
from onnxq.plan import QuantPlan
from onnxq.qparams import ActivationParams, activation_params
from onnxq.scoring.sessions import SessionSettings, needs_external_data, open_session

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]


# Session config entries of a calibration session.
NO_PREPACKING = (("session.disable_prepacking", "1"),)


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


def expose_values(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A shallow clone of the model (tensors shared) with the values `names` added as graph
    outputs, typed float where shape inference left them untyped."""
    exposed = model.clone()
    values = {value.name: value for value in _values(exposed.graph)}
    present = {value.name for value in exposed.graph.outputs}
    for name in names:
        if name not in present:
            value = values[name]
            if value.type is None:
                value.type = ir.TensorType(ir.DataType.FLOAT)
            exposed.graph.outputs.append(value)
    return exposed


def values_only(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A shallow clone of the model whose outputs are the values `names` alone, without the
    nodes they do not need (ORT runs every node of a graph, wanted or not)."""
    exposed = expose_values(model, names)
    named = set(names)
    wanted = [value for value in exposed.graph.outputs if value.name in named]
    exposed.graph.outputs.clear()
    exposed.graph.outputs.extend(wanted)
    return RemoveUnusedNodesPass()(exposed).model


def _values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def calibration_settings(settings: SessionSettings | None, model: object) -> SessionSettings:
    """The run's session settings; prepacking off for a model that goes through external data."""
    settings = settings or SessionSettings()
    if not needs_external_data(model):
        return settings
    return dataclasses.replace(settings, config_entries=settings.config_entries + NO_PREPACKING)


class Observer(Protocol):
    """Anything that streams a tensor's values: statistics, channel means, Gram matrices."""

    def update(self, x: np.ndarray) -> None: ...


def observe(model: ir.Model | onnx.ModelProto, observers: Mapping[str, Sequence[Observer]],
            feeds: Iterable[Feed], progress: Progress | None = None,
            settings: SessionSettings | None = None) -> None:
    """Run the float model once per feed and hand each watched tensor to its observers."""
    names = [name for name, watching in observers.items() if watching]
    if not names:
        return
    expose = expose_values if isinstance(model, ir.Model) else expose_tensors
    exposed = expose(model, names)
    session = open_session(exposed, "the calibration model", calibration_settings(settings, exposed))
    for feed in feeds:
        for name, array in zip(names, session.run(names, feed), strict=True):
            for observer in observers[name]:
                observer.update(array)
        if progress is not None:
            progress(1)
    del session, exposed
    gc.collect()  # the exposed clone (graphs are cyclic) holds the model's mapped weights until collected


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
