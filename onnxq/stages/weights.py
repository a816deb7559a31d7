"""Weights: the configured searcher (onnxq.weights.registry) gives every planned weight its
scales, zero points and codes (COMQ may search again afterwards: onnxq.stages.sequential_comq).

The searcher is set up before calibration (it may watch layer inputs: COMQ's Gram matrices)
and kept on the state, so the bit allocator can ask it for any layer at any bit-width before
this stage fixes the parameters of the final plan.
"""

from __future__ import annotations

from onnxq.state import Observers, QuantState
from onnxq.weights.registry import searcher_for


class WeightSearch:
    name = "weights"

    def observe(self, state: QuantState) -> Observers:
        state.weights = searcher_for(state.config.weight_searcher, state.index, state.plan.weights)
        return state.weights.observers()

    def run(self, state: QuantState) -> None:
        state.qparams.weights = {spec: state.weights.params(spec) for spec in state.plan.weights}
