"""Mixed bits as a stage: every free layer's parameters at each candidate bit-width (from the
weight searcher), their measured sensitivity, and the knapsack's choice under the budget
(onnxq.bits.allocation). Replaces the plan's bits; the weights stage then fixes the final
parameters.
"""

from __future__ import annotations

import numpy as np

from onnxq import model_io
from onnxq.bits.allocation import AllocationRequest, LayerProbes, ProbeBase, allocate_bits
from onnxq.bits.budgets import budget_from
from onnxq.config import SensitivityBase
from onnxq.emit import emit, emit_options
from onnxq.plan import QuantPlan
from onnxq.qparams import QParams
from onnxq.scoring.fidelity import verify
from onnxq.state import Observers, QuantState


class Allocation:
    name = "allocate"

    @staticmethod
    def wanted(state: QuantState) -> bool:
        return budget_from(state.config) is not None

    def observe(self, state: QuantState) -> Observers:
        return {}

    def run(self, state: QuantState) -> None:
        candidates = _Candidates(state)
        free = [spec.node for spec in state.plan.weights
                if spec.node not in state.plan.bits_rules and spec.node not in state.plan.dynamic_layers]
        layout = emit_options(state.config)
        quantized_bytes = 0
        if budget_from(state.config).counts_file:
            # measured with the free layers at 8 bits, per channel: the layout whose framing the
            # size costs (onnxq.bits.sizes.framing_bytes) count from
            at_8 = state.plan.with_weight_bits(dict.fromkeys(free, 8))
            quantized_bytes = model_io.to_proto(
                emit(state.model, at_8, candidates.qparams_for(at_8), layout)).ByteSize()
        request = AllocationRequest(state.index, state.plan, state.config, state.calibration, layout,
                                    state.float_bytes, quantized_bytes)
        probes = LayerProbes(candidates.values, candidates.probe_base(free),
                             candidates.fidelity_of if len(state.held_out) else None)
        report = allocate_bits(request, probes, state.stage_progress("sensitivity", len(free)))
        state.plan = state.plan.with_weight_bits(report.bits)
        state.reports["allocation"] = report


class _Candidates:
    """Each layer's parameters and values at any bit-width, and whole candidate models."""

    def __init__(self, state: QuantState) -> None:
        self.state = state
        self.specs = {spec.node: spec for spec in state.plan.weights}

    def values(self, layer: str, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The dequantized weight and corrected bias (or None) of `layer` at `bits`."""
        spec = self.specs[layer]
        params = self.state.weights.params(spec.at_bits(bits))
        return params.dequantized(spec.axis), self.state.biases.for_layer(spec, params)

    def float_values(self, layer: str) -> tuple[np.ndarray, np.ndarray | None]:
        spec, index = self.specs[layer], self.state.index
        bias = self.state.biases.by_layer.get(layer)
        return (index.constant(layer, spec.input_index),
                None if bias is None else index.constant(layer, bias.input_index))

    def qparams_for(self, plan: QuantPlan) -> QParams:
        weights = {spec: self.state.weights.params(spec) for spec in plan.weights}
        qparams = QParams(activations=self.state.qparams.activations, weights=weights)
        qparams.bias_values = self.state.biases.corrected(plan, weights)
        return qparams

    def probe_base(self, free: list[str]) -> ProbeBase:
        state = self.state
        if state.config.sensitivity_base is SensitivityBase.FLOAT:
            return ProbeBase(state.model, self.float_values)
        at_8 = state.plan.with_weight_bits(dict.fromkeys(free, 8))
        return ProbeBase(emit(state.model, at_8, self.qparams_for(at_8)), lambda layer: self.values(layer, 8),
                         state.float_session)

    def fidelity_of(self, bits: dict[str, int]) -> float:
        """Worst output cosine on the held-out feeds of the model emitted with these bits."""
        plan = self.state.plan.with_weight_bits(bits)
        model = emit(self.state.model, plan, self.qparams_for(plan), emit_options(self.state.config))
        _, fidelity = verify(model_io.to_proto(model), self.state.float_session, self.state.held_out,
                             held_out=True, min_cosine=None)
        return fidelity.worst_cosine
