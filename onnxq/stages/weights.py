"""Weights: the configured searcher (onnxq.weights.registry) gives every planned weight its
scales, zero points and codes; optionally COMQ again on the quantized model's layer inputs.

The searcher is set up before calibration (it may watch layer inputs: COMQ's Gram matrices)
and kept on the state, so the bit allocator can ask it for any layer at any bit-width before
this stage fixes the parameters of the final plan.
"""

from __future__ import annotations

from onnxq import model_io
from onnxq.calibration import calibrate
from onnxq.config import WeightMethod
from onnxq.emit import emit
from onnxq.index import ModelIndex
from onnxq.state import Observers, QuantState
from onnxq.weights.registry import searcher_for
from onnxq.weights.search_comq import ComqSearcher, comq_weight_params, gram_observers, input_observers


class WeightSearch:
    name = "weights"

    def observe(self, state: QuantState) -> Observers:
        state.weights = searcher_for(state.config.weight_searcher, state.index, state.plan.weights)
        return state.weights.observers()

    def run(self, state: QuantState) -> None:
        state.qparams.weights = {spec: state.weights.params(spec) for spec in state.plan.weights}


class SequentialComq:
    """COMQ again, on the inputs each layer sees in the quantized model (earlier layers'
    weights and all activations quantized) rather than the float inputs; biases are corrected
    again afterwards (by the bias stage's corrector)."""

    name = "comq inputs"

    @staticmethod
    def wanted(state: QuantState) -> bool:
        return state.config.weight_method is WeightMethod.COMQ and state.config.comq_sequential

    def observe(self, state: QuantState) -> Observers:
        return {}

    def run(self, state: QuantState) -> None:
        searcher: ComqSearcher = state.weights
        targets = searcher.targets
        quantized = emit(state.model, state.plan, state.qparams)  # DQ layout: every layer keeps its node
        grams = gram_observers(targets)
        nodes = ModelIndex(quantized).nodes
        observers = input_observers({spec.node: gram for spec, gram in grams.items()}, nodes)
        calibrate.observe(model_io.to_proto(quantized), observers, state.calibration,
                          state.stage_progress(self.name, len(state.calibration)))
        state.qparams.weights.update(comq_weight_params(targets, grams, searcher.config))
        state.qparams.bias_values = state.biases.corrected(state.plan, state.qparams.weights)
