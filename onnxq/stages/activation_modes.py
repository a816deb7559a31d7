"""`activations = auto`: each layer that can take dynamic activations gets static or dynamic
ones, whichever damages the model's outputs less, measured through ONNX Runtime on calibration
feeds (never the held-out ones, which verification keeps for itself).

    d_0          damage of the model as planned (every free layer static)
    d_L          damage with layer L alone dynamic                        (one model per layer)
    mixed        the layers with d_L < d_0 dynamic
    chosen       the least damaging of: all static, mixed, all dynamic    (the whole models)

Damage is `config.sensitivity` (output MSE by default; onnxq.scoring.damage) against the float
model's outputs on the first `config.mode_feeds` calibration feeds. Measuring whole models, and
keeping all-static and all-dynamic among the choices, makes the result at least as good as the
better uniform mode on those feeds; the per-layer step finds the layers whose input range swings
from batch to batch (dynamic wins) among those with stable ranges (static keeps its fused QLinear
kernels and its clipping, which dynamic min-max lacks).

A free layer is one `layer_activations` rules do not fix. A layer switched to dynamic gets its
weight at full range from the same searcher (`QuantPlan.with_dynamic`; a dynamic layer needs no
7-bit codes) and its bias corrected again; its input group stays in the plan (static layers
reading the same tensor keep it), and the emitter drops a Q/DQ pair that no static layer reads.
Latency is not measured here: on a shared machine a timing would make the written model depend
on the machine's load; `onnxq bench` measures the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnxq import model_io
from onnxq.config import ActivationMode
from onnxq.emit import emit, emit_options
from onnxq.passes.dynamic_quantize import dynamic_capable
from onnxq.plan import BiasQuant, QuantPlan
from onnxq.qparams import QParams
from onnxq.scoring.damage import output_damage
from onnxq.scoring.scorer import CheckedSession
from onnxq.state import Observers, QuantState


@dataclass(frozen=True)
class ModeReport:
    """What auto measured: per free layer its damage alone dynamic, and the whole candidates'."""

    measure: str
    feeds: int
    static_damage: float
    alone: dict[str, float] = field(default_factory=dict)
    candidates: dict[str, float] = field(default_factory=dict)
    chosen: str = "static"


def free_layers(state: QuantState) -> list[str]:
    """Planned 8-bit layers that can take dynamic activations and no rule fixed, in plan order."""
    plan = state.plan
    return [spec.node for spec in plan.weights
            if spec.node not in plan.mode_rules and spec.node not in plan.dynamic_layers
            and spec.grid.bits == 8 and dynamic_capable(state.index.node(spec.node)) is None]


def qparams_for(state: QuantState, plan: QuantPlan) -> QParams:
    """The run's parameters for `plan`: weights it re-planned (dynamic at full range) from the
    run's searcher, their biases corrected again."""
    known = state.qparams.weights
    weights = {spec: known[spec] if spec in known else state.weights.params(spec) for spec in plan.weights}
    bias_values = dict(state.qparams.bias_values)
    for spec in plan.weights:
        bias = plan_bias(plan, spec.node)
        if spec not in known and bias is not None and bias in state.biases.correctable:
            bias_values[bias] = state.biases.for_layer(spec, weights[spec])
    return QParams(activations=state.qparams.activations, weights=weights, bias_values=bias_values)


def plan_bias(plan: QuantPlan, layer: str) -> BiasQuant | None:
    return next((spec for spec in plan.biases if spec.node == layer), None)


class _Probe:
    """The damage of the plan with some more layers dynamic, through ORT on a few feeds."""

    def __init__(self, state: QuantState) -> None:
        self.state = state
        count = min(len(state.calibration), state.config.mode_feeds)
        self.feeds = [state.calibration.feed(i) for i in range(count)]
        self.names = state.float_session.output_names
        self.reference = [state.float_session.run(self.names, feed) for feed in self.feeds]

    def damage(self, dynamic: list[str]) -> float:
        state = self.state
        plan = state.plan.with_dynamic(dict.fromkeys(dynamic, "auto"))
        model = emit(state.model, plan, qparams_for(state, plan), emit_options(state.config))
        proto = model_io.to_proto(model)
        label = "an activation-mode candidate"
        session = CheckedSession(state.scorer.session(proto, label), label)
        outputs = [session.run(self.names, feed) for feed in self.feeds]
        return output_damage(state.config.sensitivity, self.reference, outputs)


class ActivationModes:
    name = "modes"

    @staticmethod
    def wanted(state: QuantState) -> bool:
        return state.config.activations is ActivationMode.AUTO

    def observe(self, state: QuantState) -> Observers:
        return {}

    def run(self, state: QuantState) -> None:
        free = free_layers(state)
        if not free:
            return
        probe = _Probe(state)
        tick = state.stage_progress(self.name, len(free) + 3) or (lambda advance: None)
        static = probe.damage([])
        alone = {}
        for layer in free:
            alone[layer] = probe.damage([layer])
            tick(1)
        mixed = [layer for layer in free if alone[layer] < static]
        layers = {"static": [], "dynamic": free}
        candidates = {"static": static, "dynamic": probe.damage(free)}
        if mixed and mixed != free:
            layers["mixed"], candidates["mixed"] = mixed, probe.damage(mixed)
        tick(3)
        chosen = min(candidates, key=lambda name: (candidates[name], name != "static"))
        report = ModeReport(state.config.sensitivity.value, len(probe.feeds), static, alone, candidates,
                            chosen)
        _apply(state, free, layers[chosen], report)


def _apply(state: QuantState, free: list[str], dynamic: list[str], report: ModeReport) -> None:
    """Make the chosen layers dynamic and say why each free layer has its mode."""
    whole = ", ".join(f"{name} {value:.3g}" for name, value in report.candidates.items())
    reasons = {layer: (f"auto: {report.chosen} model chosen ({report.measure} of whole models: "
                       f"{whole}); this layer alone dynamic {report.alone[layer]:.3g} vs all "
                       f"static {report.static_damage:.3g}") for layer in free}
    plan = state.plan.with_dynamic({layer: reasons[layer] for layer in dynamic})
    state.qparams = qparams_for(state, plan)
    for layer in free:
        plan.static_reasons.pop(layer, None)
        if layer not in dynamic:
            plan.static_reasons[layer] = reasons[layer]
    state.plan = plan
    state.reports["activation_modes"] = report
