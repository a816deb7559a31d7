"""Load and prepare: the float model checked and opened in ORT, feeds split, graph passes run,
SmoothQuant applied, and the `QuantPlan` annotated. Everything later works on this state.

    model -> checked proto -> float session (an op ORT cannot run fails here)
    feeds -> calibration + held-out (seeded); none at all for a dynamic-only run
    prepare passes (opset, constants, BatchNorm and Pad folding) -> channel equalization of Conv
    activations and SmoothQuant of MatMul inputs (one ORT pass over channel maxima: both change
    weights and constants before statistics are taken; both exact in float) -> annotate
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import model_io
from onnxq.calibration import calibrate
from onnxq.calibration.calibrate import ChannelAbsMax
from onnxq.config import QuantConfig
from onnxq.data import HOW_TO_MAKE_DATA, CalibrationSet, no_feeds, open_calibration
from onnxq.errors import CalibrationDataError
from onnxq.index import ModelIndex
from onnxq.passes import INT4_MIN_OPSET, QDQ_MIN_OPSET, prepare
from onnxq.passes.annotate import annotate, excluded_nodes
from onnxq.passes.equalize import EqualizeChannelsPass, equalization_candidates
from onnxq.passes.smooth import SmoothMatMulInputsPass, smoothing_candidates
from onnxq.report.provenance import source_provenance
from onnxq.scoring.scorer import Scorer
from onnxq.scoring.sessions import SessionSettings
from onnxq.state import ProgressCallback, QuantState

ModelSource = str | Path | onnx.ModelProto | ir.Model


def load_state(model: ModelSource, calib: object, config: QuantConfig,
               progress: ProgressCallback | None = None) -> QuantState:
    """The run's starting state: the checked float model (opened once in ORT) and its feeds."""
    proto, source = _as_proto(model)
    scorer = Scorer(SessionSettings(provider=config.provider))
    float_session = scorer.reference(source or proto)  # by path: ORT maps external weights, no copy
    feeds = _no_data(proto, config) if calib is None else open_calibration(calib, proto)
    provenance = source_provenance(source, proto, feeds, feeds.origin)
    if config.max_feeds is not None and len(feeds) > config.max_feeds:
        feeds = feeds.subset(range(config.max_feeds))
    calibration, held_out = feeds.split(config.holdout, np.random.default_rng(config.seed))
    state = QuantState(config=config, float_model=proto, source=source, scorer=scorer,
                       float_session=float_session, calibration=calibration, held_out=held_out,
                       provenance=provenance, progress=progress)
    scorer.reference(float_session, state.fidelity_feeds)  # cached now, so the session can close
    float_session.release()  # reopened only if a stage asks for another feed
    return state


def _no_data(proto: onnx.ModelProto, config: QuantConfig) -> CalibrationSet:
    """The empty feed set of a run without data; an error when the config needs data."""
    needs = config.needs_calibration()
    if needs:
        raise CalibrationDataError(f"no calibration data given, and it is needed for: {'; '.join(needs)} "
                                   f"(only activations = dynamic runs without); {HOW_TO_MAKE_DATA}")
    return no_feeds(proto)


def prepare_state(state: QuantState) -> None:
    """Graph passes, SmoothQuant and the plan: fills `model`, `index` and `plan`. Without
    calibration data, equalization and SmoothQuant are skipped (they need channel ranges)."""
    config = state.config
    opset = INT4_MIN_OPSET if config.lowest_weight_bits <= 4 else QDQ_MIN_OPSET
    folder = Path(state.source).parent if state.source else None  # where external weights lie
    state.model = prepare(model_io.to_ir(state.float_model, folder), opset)
    calibrated = len(state.calibration) > 0
    if calibrated:
        _equalize_and_smooth(state)
        state.spill_weights()
    state.plan = annotate(state.model, config, calibrated)
    state.index = ModelIndex(state.model)


def _as_proto(model: ModelSource) -> tuple[onnx.ModelProto, str | None]:
    if isinstance(model, (str, Path)):
        return model_io.load_model(model, external_data=False), str(model)  # weights stay in the file
    if isinstance(model, ir.Model):
        proto = model_io.to_proto(model)
    elif isinstance(model, onnx.ModelProto):
        proto = model
    else:
        raise TypeError(f"model must be a path, onnx.ModelProto or onnx_ir.Model, not {type(model)}")
    model_io.check_model(proto, "the model")
    return proto, None


def _equalize_and_smooth(state: QuantState) -> None:
    """Channel equalization of Conv activations (maxima per axis-1 channel) and SmoothQuant of
    weight MatMul inputs (per last-axis channel), from one pass over the calibration feeds."""
    config = state.config
    skip = frozenset(excluded_nodes(state.model.graph, config.exclude))
    dense_alpha = config.equalize_alpha if config.equalize_alpha > 0 else None
    equalize = equalization_candidates(state.model, skip, dense_alpha is not None) if config.equalize else []
    smooth = smoothing_candidates(state.model, skip) if config.smooth else []
    if not equalize and not smooth:
        return
    observers = {name: {"equalize": ChannelAbsMax(axis=1)} for name in equalize}
    for name in smooth:
        observers.setdefault(name, {})["smooth"] = ChannelAbsMax(axis=-1)
    calibrate.observe(state.model, {name: list(kinds.values()) for name, kinds in observers.items()},
                      state.calibration, state.stage_progress("channels", len(state.calibration)))

    def maxima(kind: str) -> dict[str, np.ndarray]:
        return {name: kinds[kind].value for name, kinds in observers.items()
                if kind in kinds and kinds[kind].value is not None}

    if equalize:
        EqualizeChannelsPass(maxima("equalize"), skip, dense_alpha)(state.model)
    if smooth:
        SmoothMatMulInputsPass(maxima("smooth"), config.effective_smooth_alpha, skip)(state.model)
