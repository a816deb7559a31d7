"""The last two stages: emit the quantized model (onnxq.emit: layout only, no scale chosen
here) and verify it before anything is written (checker, an ORT session, fidelity to the float
model on held-out feeds, `min_cosine`). A run without data (dynamic activations only) is
checked and loaded in ORT, and its fidelity left unmeasured: a report of no outputs on 0 feeds."""

from __future__ import annotations

from onnxq import model_io
from onnxq.emit import emit, emit_options
from onnxq.scoring.fidelity import FidelityReport, verify
from onnxq.state import Observers, QuantState


class Emit:
    name = "emit"

    def observe(self, state: QuantState) -> Observers:
        return {}

    def run(self, state: QuantState) -> None:
        model = emit(state.model, state.plan, state.qparams, emit_options(state.config))
        state.quantized = model_io.to_proto(model)


class Verify:
    name = "verify"

    def observe(self, state: QuantState) -> Observers:
        return {}

    def run(self, state: QuantState) -> None:
        feeds = state.fidelity_feeds
        _, report = verify(state.quantized, state.float_session, feeds, held_out=len(state.held_out) > 0,
                           min_cosine=state.config.min_cosine if len(feeds) else None)
        state.reports["fidelity"] = report if len(feeds) else FidelityReport((), 0, held_out=False)
