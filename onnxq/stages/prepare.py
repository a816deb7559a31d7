"""Load and prepare: the float model checked and opened in ORT, feeds split, graph passes run,
SmoothQuant applied, and the `QuantPlan` annotated. Everything later works on this state.

    model -> checked proto -> float session (an op ORT cannot run fails here)
    feeds -> calibration + held-out (seeded)
    prepare passes (opset, constants, BatchNorm folding) -> SmoothQuant (its own ORT pass over
    channel maxima: it must change the weights before statistics are taken) -> annotate
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import model_io
from onnxq.calibration import calibrate
from onnxq.config import QuantConfig
from onnxq.data import open_calibration
from onnxq.index import ModelIndex
from onnxq.passes import INT4_MIN_OPSET, QDQ_MIN_OPSET, prepare
from onnxq.passes.annotate import annotate, excluded_nodes
from onnxq.passes.smooth import SmoothMatMulInputsPass, smoothing_candidates
from onnxq.scoring.scorer import Scorer
from onnxq.scoring.sessions import SessionSettings
from onnxq.state import ProgressCallback, QuantState

ModelSource = str | Path | onnx.ModelProto | ir.Model


def load_state(model: ModelSource, calib: object, config: QuantConfig,
               progress: ProgressCallback | None = None) -> QuantState:
    """The run's starting state: the checked float model (opened once in ORT) and its feeds."""
    proto, source = _as_proto(model)
    scorer = Scorer(SessionSettings(provider=config.provider))
    float_session = scorer.reference(proto)
    feeds = open_calibration(calib, proto)
    if config.max_feeds is not None and len(feeds) > config.max_feeds:
        feeds = feeds.subset(range(config.max_feeds))
    calibration, held_out = feeds.split(config.holdout, np.random.default_rng(config.seed))
    return QuantState(config=config, float_model=proto, source=source, scorer=scorer,
                      float_session=float_session, calibration=calibration, held_out=held_out,
                      progress=progress)


def prepare_state(state: QuantState) -> None:
    """Graph passes, SmoothQuant and the plan: fills `model`, `index` and `plan`."""
    config = state.config
    opset = INT4_MIN_OPSET if config.lowest_weight_bits <= 4 else QDQ_MIN_OPSET
    state.model = prepare(model_io.to_ir(state.float_model), opset)
    if config.smooth:
        _smooth(state)
    state.plan = annotate(state.model, config)
    state.index = ModelIndex(state.model)


def _as_proto(model: ModelSource) -> tuple[onnx.ModelProto, str | None]:
    if isinstance(model, (str, Path)):
        return model_io.load_model(model), str(model)
    if isinstance(model, ir.Model):
        proto = model_io.to_proto(model)
    elif isinstance(model, onnx.ModelProto):
        proto = model
    else:
        raise TypeError(f"model must be a path, onnx.ModelProto or onnx_ir.Model, not {type(model)}")
    model_io.check_model(proto, "the model")
    return proto, None


def _smooth(state: QuantState) -> None:
    """SmoothQuant on the inputs of weight MatMuls, from their per-channel ranges."""
    skip = frozenset(excluded_nodes(state.model.graph, state.config.exclude))
    candidates = smoothing_candidates(state.model, skip)
    if candidates:
        absmax = calibrate.collect_channel_absmax(
            model_io.to_proto(state.model), candidates, state.calibration,
            state.stage_progress("smooth", len(state.calibration)))
        SmoothMatMulInputsPass(absmax, state.config.effective_smooth_alpha, skip)(state.model)
