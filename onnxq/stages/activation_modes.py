"""`activations = auto`: each layer that can take dynamic activations gets static or dynamic
ones, whichever damages the model's outputs less, measured through ONNX Runtime on calibration
feeds (never the held-out ones, which verification keeps for itself).

    d_0          damage of the model as planned (every free layer static)
    d_L          damage with layer L alone dynamic                        (one model per layer)
    mixed        the layers with d_L < d_0 dynamic
    latency      p50 of each whole candidate and of the float model, timed side by side in ORT
    chosen       the least damaging candidate among those within `mode_latency_slack` (of the
                 float model's latency) of the fastest, and within `max_latency` when set

Damage is `config.sensitivity` (output MSE by default; onnxq.scoring.damage) against the float
model's outputs on the first `config.mode_feeds` calibration feeds. Measuring whole models, and
keeping all-static and all-dynamic among the choices, makes the result at least as good as the
better uniform mode on those feeds, unless it is slower: a dynamic layer can cost more than it
saves (EfficientNet-Lite0's classifier as DynamicQuantizeMatMul: 0.80x float against 0.70x
for QGemm, 1 thread, in one measurement on a loaded machine), and a mode chosen for 0.001 less
damage at 13% more latency is not what a user of `auto` wants. The per-layer step finds the
layers whose input range swings from batch to batch (dynamic wins) among those with stable
ranges (static keeps its fused QLinear kernels and its clipping, which dynamic min-max lacks).

A free layer is one `layer_activations` rules do not fix. A layer switched to dynamic gets its
weight at full range from the same searcher (`QuantPlan.with_dynamic`; a dynamic layer needs no
7-bit codes) and its bias corrected again; its input group stays in the plan (static layers
reading the same tensor keep it), and the emitter drops a Q/DQ pair that no static layer reads.
Latency is timed on the first calibration feed at `latency_threads` intra-op threads
(onnxq.scoring.latency): the choice is as stable as the gap between candidates, which is why
candidates within the slack count as equally fast, and the card records the timings.
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
from onnxq.scoring.latency import Timing, latency_ratios
from onnxq.scoring.scorer import CheckedSession
from onnxq.state import Observers, QuantState


@dataclass(frozen=True)
class ModeReport:
    """What auto measured: per free layer its damage alone dynamic, the whole candidates' damage
    and latency (ratio to the float model's p50), and which candidate was chosen and why."""

    measure: str
    feeds: int
    static_damage: float
    alone: dict[str, float] = field(default_factory=dict)
    candidates: dict[str, float] = field(default_factory=dict)
    chosen: str = "static"
    latency: dict[str, float] = field(default_factory=dict)
    why: str = ""


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
    """The damage of the plan with some more layers dynamic, through ORT on a few feeds; the
    whole models measured are kept by name for timing."""

    def __init__(self, state: QuantState) -> None:
        self.state = state
        count = min(len(state.calibration), state.config.mode_feeds)
        self.feeds = [state.calibration.feed(i) for i in range(count)]
        self.names = state.float_session.output_names
        self.reference = [state.float_session.run(self.names, feed) for feed in self.feeds]
        self.models: dict[str, object] = {}

    def damage(self, dynamic: list[str], keep_as: str | None = None) -> float:
        state = self.state
        plan = state.plan.with_dynamic(dict.fromkeys(dynamic, "auto"))
        model = emit(state.model, plan, qparams_for(state, plan), emit_options(state.config))
        proto = model_io.to_proto(model)
        label = "an activation-mode candidate"
        session = CheckedSession(state.scorer.session(proto, label), label)
        outputs = [session.run(self.names, feed) for feed in self.feeds]
        if keep_as is not None:
            self.models[keep_as] = proto
        return output_damage(state.config.sensitivity, self.reference, outputs)

    def latency(self) -> dict[str, float]:
        """Each kept model's p50 as a ratio to the float model's, timed side by side."""
        state = self.state
        timing = Timing.for_config(state.config)
        return latency_ratios(state.source or state.float_model, self.models, self.feeds[0],
                              timing).ratios


def choose(damage: dict[str, float], latency: dict[str, float], slack: float,
           max_latency: float | None) -> tuple[str, str]:
    """The candidate to write and why: the least damaging among those whose latency ratio is
    within `slack` of the fastest's and within `max_latency`; the fastest when none meets
    `max_latency`. Ties go to static (its fused kernels), then to the name."""
    fastest = min(latency.values())
    allowed = [name for name in damage if latency[name] <= fastest + slack
               and (max_latency is None or latency[name] <= max_latency)]
    if not allowed:
        name = min(latency, key=lambda candidate: (latency[candidate], candidate))
        return name, (f"no candidate within max_latency {max_latency:g} (fastest {fastest:.2f}x "
                      f"float): the fastest")
    name = min(allowed, key=lambda candidate: (damage[candidate], candidate != "static", candidate))
    slower = [other for other in damage if other not in allowed]
    why = f"least damaging of {', '.join(allowed)}"
    if slower:
        why += f" ({', '.join(slower)} slower than {fastest:.2f}x + {slack:g} or over max_latency)"
    return name, why


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
        tick = state.stage_progress(self.name, len(free) + 4) or (lambda advance: None)
        static = probe.damage([], keep_as="static")
        alone = {}
        for layer in free:
            alone[layer] = probe.damage([layer])
            tick(1)
        mixed = [layer for layer in free if alone[layer] < static]
        layers = {"static": [], "dynamic": free}
        candidates = {"static": static, "dynamic": probe.damage(free, keep_as="dynamic")}
        if mixed and mixed != free:
            layers["mixed"], candidates["mixed"] = mixed, probe.damage(mixed, keep_as="mixed")
        tick(3)
        latency = probe.latency()
        tick(1)
        config = state.config
        chosen, why = choose(candidates, latency, config.mode_latency_slack, config.max_latency)
        report = ModeReport(config.sensitivity.value, len(probe.feeds), static, alone, candidates,
                            chosen, latency, why)
        _apply(state, free, layers[chosen], report)


def _apply(state: QuantState, free: list[str], dynamic: list[str], report: ModeReport) -> None:
    """Make the chosen layers dynamic and say why each free layer has its mode."""
    whole = ", ".join(f"{name} {value:.3g} at {report.latency[name]:.2f}x float latency"
                      for name, value in report.candidates.items())
    reasons = {layer: (f"auto: {report.chosen} model chosen, {report.why} ({report.measure} of "
                       f"whole models: {whole}); this layer alone dynamic {report.alone[layer]:.3g} vs all "
                       f"static {report.static_damage:.3g}") for layer in free}
    plan = state.plan.with_dynamic({layer: reasons[layer] for layer in dynamic})
    state.qparams = qparams_for(state, plan)
    for layer in free:
        plan.static_reasons.pop(layer, None)
        if layer not in dynamic:
            plan.static_reasons[layer] = reasons[layer]
    state.plan = plan
    state.reports["activation_modes"] = report
