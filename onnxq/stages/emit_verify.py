"""The last two stages: emit the quantized model (onnxq.emit: layout only, no scale chosen
here) and verify it before anything is written (checker, an ORT session, fidelity to the float
model on held-out feeds, `min_cosine`)."""

from __future__ import annotations

from onnxq import model_io
from onnxq.emit import emit, emit_options
from onnxq.scoring.fidelity import verify
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
        _, state.reports["fidelity"] = verify(state.quantized, state.float_session, state.fidelity_feeds,
                                              held_out=len(state.held_out) > 0,
                                              min_cosine=state.config.min_cosine)
