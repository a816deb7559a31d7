"""`onnxq.quantize`: from a float model and calibration data to a verified quantized model held
in memory. It holds no algorithm: it builds the run's state, runs the stages in data-flow order
(onnxq.state), and returns the result.

    load -> prepare (passes, SmoothQuant, plan) -> one calibration pass for every stage
      -> ranges -> allocate (when a budget is set) -> weights -> bias -> sequential comq (when asked)
      -> modes (activations = auto) -> evolq (scale search, when asked) -> emit -> verify
      -> QuantResult

Nothing is written until `QuantResult.save`, which writes atomically and never over the input.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxq import weights as _searchers  # noqa: F401  (registers the weight searchers)
from onnxq.config import QuantConfig
from onnxq.result import QuantResult
from onnxq.stages.activation_modes import ActivationModes
from onnxq.stages.allocate import Allocation
from onnxq.stages.bias import BiasCorrection
from onnxq.stages.emit_verify import Emit, Verify
from onnxq.stages.evolq import EvolqSearch
from onnxq.stages.latency import MeasureLatency
from onnxq.stages.prepare import load_state, prepare_state
from onnxq.stages.ranges import ActivationRanges
from onnxq.stages.sequential_comq import SequentialComq
from onnxq.stages.weights import WeightSearch
from onnxq.state import ProgressCallback, QuantState, Stage, run_stages

__all__ = ["ProgressCallback", "QuantResult", "quantize"]


def quantize(
    model: str | Path | onnx.ModelProto | ir.Model,
    calib: object = None,
    config: QuantConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> QuantResult:
    """Quantize a float model to QDQ with calibration data.

    Args:
        model: path of an ONNX file, an `onnx.ModelProto` or an `onnx_ir.Model`.
        calib: a `.npz` path (samples on axis 0), a folder of `.npz` feeds, or any iterable of
            feed dicts {input name: array}; None only with `activations = dynamic` (nothing
            else needs no data), and the fidelity is then not measured.
        config: options; defaults to `QuantConfig()`.
        progress: optional callback (stage, advance, total) for progress display.
    """
    config = config or QuantConfig()
    start = time.perf_counter()
    state = load_state(model, calib, config, progress)
    state.seconds["load"] = time.perf_counter() - start
    with state.timed("prepare"):
        prepare_state(state)
    run_stages(state, stages_for(state))
    return QuantResult(
        model=state.quantized, plan=state.plan, qparams=state.qparams, config=config,
        fidelity=state.reports["fidelity"], calibration_feeds=len(state.calibration),
        float_bytes=state.float_bytes, quantized_bytes=state.quantized.ByteSize(),
        searched_layers=state.weights.searched_layers, seconds=state.seconds, source=state.source,
        allocation=state.reports.get("allocation"), search=state.reports.get("search"),
        modes=state.reports.get("activation_modes"), latency=state.reports.get("latency"),
        provenance=state.provenance)


def stages_for(state: QuantState) -> list[Stage]:
    """The stages this run's config asks for, in the order they run."""
    optional = {Allocation: Allocation.wanted(state), SequentialComq: SequentialComq.wanted(state),
                EvolqSearch: EvolqSearch.wanted(state), ActivationModes: ActivationModes.wanted(state),
                MeasureLatency: MeasureLatency.wanted(state)}
    order = [ActivationRanges, Allocation, WeightSearch, BiasCorrection, SequentialComq, ActivationModes,
             EvolqSearch, Emit, Verify, MeasureLatency]
    return [stage() for stage in order if optional.get(stage, True)]
