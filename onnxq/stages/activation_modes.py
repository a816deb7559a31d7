"""`activations = auto`: each layer gets static, dynamic or float activations, whichever damages
the model's outputs least at a latency within the slack of the fastest, measured through ONNX
Runtime on calibration feeds (never the held-out ones, which verification keeps for itself).

    d_0          damage of the model as planned (every free layer static)
    d_L          damage with layer L alone dynamic                        (one model per layer)
    f_L          damage with layer L alone reading float activations      (one model per layer)
    mixed        the layers with d_L < d_0 dynamic
    F            the layers whose f_L < (1 - FLOAT_SHARE) d_0: each removes at least that share
                 of the model's damage alone (input rounding that costs the outputs most)
    float        F float, the rest static; float_top: only the first of F (least f_L);
                 mixed_float (dynamic_float when every free layer helped): those layers
                 dynamic and F float (float where a layer is in both); a float candidate
                 counts only if it removes FLOAT_SHARE of its base's damage on the selection
                 feeds too
    whole        static, dynamic, mixed and the float candidates (those that exist), each on
                 the selection feeds: a candidate other than
                 static is trusted only if it lowers the pooled damage AND the damage of a
                 strict majority of the selection feeds (onnxq.search.keep, the rule Evol-Q's
                 blocks pass too)
    latency      p50 of each whole candidate and of the float model, timed side by side in ORT
    chosen       among the candidates within `mode_latency_slack` (of the float model's latency)
                 of the fastest and within `max_latency` when set: the least damaging trusted
                 one (static when no other is trusted)

Damage is `config.sensitivity` (output MSE by default; onnxq.scoring.damage) against the float
model's outputs. The calibration feeds are split: d_0 and d_L on the screening feeds (the first
`config.mode_feeds`, at most half of them), the whole candidates on the next ones (selection
feeds, as many again). Mixed is made of the layers that helped on the screening feeds, so its
damage there is biased low; judged on feeds it was not built from, and feed by feed, a mixed
model that only fits the screening feeds falls back to static. On PP-OCRv4 (W8A8) the layers
that "helped" moved each layer's damage by 0.4% and the mixed model, pooled on the same feeds,
looked 12% better than static while its held-out calibration cosine was lower. With a single
calibration feed the two sets are that one feed (the card says so).

A layer with float activations keeps its quantized weight (a weight-only layer: the file is no
larger, so a size budget the allocation met still holds) and runs the float op; its input's
Q/DQ pair goes where no other layer reads it (onnxq.passes.float_activations). Only the
latency slack keeps float candidates out: they always lower the damage, and they cost the
integer kernel they give up. Any quantized layer may go float (Convs too), dynamic only MatMul
and Gemm.

Measuring whole models, and keeping all-static and all-dynamic among the choices, makes the
result at least as good as the better uniform mode on the selection feeds, unless it is slower:
a dynamic layer can cost more than it saves (EfficientNet-Lite0's classifier as
DynamicQuantizeMatMul: 0.80x float against 0.70x for QGemm, 1 thread, in one measurement on a
loaded machine), and a mode chosen for 0.001 less damage at 13% more latency is not what a user
of `auto` wants. The per-layer step finds the layers whose input range swings from batch to
batch (dynamic wins) among those with stable ranges (static keeps its fused QLinear kernels and
its clipping, which dynamic min-max lacks).

A free layer is one `layer_activations` rules do not fix. A layer switched to dynamic gets its
weight at full range from the same searcher (`QuantPlan.with_dynamic`; a dynamic layer needs no
7-bit codes) and its bias corrected again; its input group stays in the plan (static layers
reading the same tensor keep it), and the emitter drops a Q/DQ pair that no static layer reads.
Latency is timed on the median-size feed (`QuantState.timing_feed`) at `latency_threads` intra-op threads
(onnxq.scoring.latency): the choice is as stable as the gap between candidates, which is why
candidates within the slack count as equally fast, and the card records the timings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxq import model_io
from onnxq.config import ActivationMode
from onnxq.emit import emit, emit_options
from onnxq.passes.dynamic_quantize import dynamic_capable
from onnxq.plan import BiasQuant, QuantPlan
from onnxq.qparams import QParams
from onnxq.scoring.damage import output_damage
from onnxq.scoring.latency import Timing, latency_ratios
from onnxq.scoring.scorer import CheckedSession
from onnxq.search.keep import decide
from onnxq.state import Observers, QuantState


@dataclass(frozen=True)
class ModeReport:
    """What auto measured: per free layer its damage alone dynamic (screening feeds), the whole
    candidates' damage on the selection feeds, how many selection feeds each improved over
    static, their latency (ratio to the float model's p50), and which was chosen and why."""

    measure: str
    feeds: int
    static_damage: float
    alone: dict[str, float] = field(default_factory=dict)
    candidates: dict[str, float] = field(default_factory=dict)
    chosen: str = "static"
    latency: dict[str, float] = field(default_factory=dict)
    why: str = ""
    selection_feeds: int = 0
    improved_feeds: dict[str, int] = field(default_factory=dict)
    alone_float: dict[str, float] = field(default_factory=dict)


# A layer joins the float candidates when float activations alone remove at least this share of
# the planned model's damage (screening feeds): one layer that carries a tenth of the error.
FLOAT_SHARE = 0.1


def free_layers(state: QuantState) -> list[str]:
    """Planned 8-bit layers that can take dynamic activations and no rule fixed, in plan order."""
    plan = state.plan
    return [spec.node for spec in plan.weights
            if spec.node not in plan.mode_rules and spec.node not in plan.dynamic_layers
            and spec.grid.bits == 8 and dynamic_capable(state.index.node(spec.node)) is None]


def float_free_layers(state: QuantState) -> list[str]:
    """Planned static layers (any op, any bits) no rule fixed: those that may read float inputs."""
    plan = state.plan
    return [spec.node for spec in plan.weights
            if spec.node not in plan.mode_rules and plan.activation_mode(spec.node) == "static"]


def float_layers(alone_float: dict[str, float], static: float) -> list[str]:
    """F: the layers whose float activations alone remove at least FLOAT_SHARE of `static`'s
    damage, the most helpful first (ties by name)."""
    helpful = [layer for layer, damage in alone_float.items() if damage < (1 - FLOAT_SHARE) * static]
    return sorted(helpful, key=lambda layer: (alone_float[layer], layer))


# Float candidates and the candidate their float layers are added to.
FLOAT_BASES = {"float_top": "static", "float": "static", "mixed_float": "mixed",
               "dynamic_float": "dynamic"}


def _float_pays(name: str, damage: dict[str, float]) -> bool:
    """A float candidate counts only if its float layers remove FLOAT_SHARE of its base's
    damage on the selection feeds too (as they did alone on the screening feeds): float
    layers give up integer kernels, which the latency slack may not see."""
    base = FLOAT_BASES.get(name)
    return base is None or damage[name] <= (1 - FLOAT_SHARE) * damage[base]


def candidate_layers(free: list[str], mixed: list[str], floating: list[str]
                     ) -> dict[str, tuple[list[str], list[str]]]:
    """Each whole candidate's (dynamic layers, float layers)."""
    layers = {"static": ([], []), "dynamic": (free, [])}
    if mixed and mixed != free:
        layers["mixed"] = (mixed, [])
    if floating:
        layers["float_top"] = ([], floating[:1])
        if len(floating) > 1:
            layers["float"] = ([], floating)
        if mixed:  # the layers that helped dynamic: all of them (dynamic) or some (mixed)
            name = "mixed_float" if "mixed" in layers else "dynamic_float"
            layers[name] = ([layer for layer in mixed if layer not in floating], floating)
    return layers


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


def split_feeds(available: int, wanted: int) -> tuple[range, range]:
    """Screening and selection feed indices: the first min(wanted, half) feeds, then as many
    again; with one feed both are that feed."""
    if available <= 1:
        return range(available), range(available)
    screen = min(wanted, available // 2)
    return range(screen), range(screen, min(available, 2 * screen))


class _Probe:
    """The damage of the plan with some more layers dynamic, through ORT, per feed; the whole
    models measured are kept by name for timing."""

    def __init__(self, state: QuantState) -> None:
        self.state = state
        screen, select = split_feeds(len(state.calibration), state.config.mode_feeds)
        self.names = state.float_session.output_names
        self.screen, self.select = self._feeds(screen), self._feeds(select)
        self.models: dict[str, object] = {}

    def _feeds(self, indices: range) -> tuple[list[dict], list]:
        feeds = [self.state.calibration.feed(i) for i in indices]
        return feeds, [self.state.float_session.run(self.names, feed) for feed in feeds]

    def damage(self, dynamic: list[str], floating: list[str] = (),
               keep_as: str | None = None) -> tuple[float, list[float]]:
        """Pooled damage with these layers dynamic and these reading float, and each feed's
        own: on the selection feeds for a whole candidate (`keep_as`, kept for timing), else on
        the screening feeds."""
        state = self.state
        plan = state.plan.with_dynamic(dict.fromkeys(dynamic, "auto"))
        plan = plan.with_float_activations(dict.fromkeys(floating, "auto"))
        model = emit(state.model, plan, qparams_for(state, plan), emit_options(state.config))
        proto = model_io.to_proto(model)
        label = "an activation-mode candidate"
        session = CheckedSession(state.scorer.session(proto, label), label)
        feeds, reference = self.select if keep_as is not None else self.screen
        outputs = [session.run(self.names, feed) for feed in feeds]
        if keep_as is not None:
            self.models[keep_as] = proto
        measure = state.config.sensitivity
        per_feed = [output_damage(measure, [ref], [out]) for ref, out in zip(reference, outputs, strict=True)]
        return output_damage(measure, reference, outputs), per_feed

    def latency(self) -> dict[str, float]:
        """Each kept model's p50 as a ratio to the float model's, timed side by side."""
        state = self.state
        timing = Timing.for_config(state.config)
        return latency_ratios(state.source or state.float_model, self.models, state.timing_feed,
                              timing).ratios


def choose(damage: dict[str, float], latency: dict[str, float], slack: float,
           max_latency: float | None, trusted: set[str] | None = None) -> tuple[str, str]:
    """The candidate to write and why: among those whose latency ratio is within `slack` of the
    fastest's and within `max_latency`, the least damaging of the `trusted` ones (static and
    the candidates that beat it feed by feed; all when None), else the least damaging; the
    fastest when none meets `max_latency`. Ties go to static (its fused kernels), then to the
    name."""
    trusted = set(damage) if trusted is None else trusted | {"static"}
    fastest = min(latency.values())
    allowed = [name for name in damage if latency[name] <= fastest + slack
               and (max_latency is None or latency[name] <= max_latency)]
    if not allowed:
        name = min(latency, key=lambda candidate: (latency[candidate], candidate))
        return name, (f"no candidate within max_latency {max_latency:g} (fastest {fastest:.2f}x "
                      f"float): the fastest")
    name = min(allowed, key=lambda candidate: (candidate not in trusted, damage[candidate],
                                               candidate != "static", candidate))
    slower = [other for other in damage if other not in allowed]
    fast_trusted = [other for other in allowed if other in trusted]
    untrusted = [other for other in allowed if other not in trusted]
    why = f"least damaging of {', '.join(fast_trusted or allowed)}"
    if untrusted:
        why += (f" ({', '.join(untrusted)} not trusted: not better than static on most selection "
                f"feeds, or float layers that removed less than {FLOAT_SHARE:g} of the damage"
                f"{'' if fast_trusted else ', but static is slower'})")
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
        free, float_free = free_layers(state), float_free_layers(state)
        if not free and not float_free:
            return
        probe = _Probe(state)
        tick = state.stage_progress(self.name, len(free) + len(float_free) + 7) or (lambda advance: None)
        static = probe.damage([])[0]
        alone, alone_float = {}, {}
        for layer in free:
            alone[layer] = probe.damage([layer])[0]
            tick(1)
        for layer in float_free:
            alone_float[layer] = probe.damage([], [layer])[0]
            tick(1)
        mixed = [layer for layer in free if alone[layer] < static]
        layers = candidate_layers(free, mixed, float_layers(alone_float, static))
        whole = {name: probe.damage(*chosen, keep_as=name) for name, chosen in layers.items()}
        tick(6)
        base = whole["static"]
        verdicts = {name: decide(base[0], pooled, np.array(base[1]), np.array(per_feed))
                    for name, (pooled, per_feed) in whole.items() if name != "static"}
        latency = probe.latency()
        tick(1)
        config = state.config
        candidates = {name: pooled for name, (pooled, _) in whole.items()}
        trusted = {name for name, verdict in verdicts.items()
                   if verdict.kept and _float_pays(name, candidates)}
        chosen, why = choose(candidates, latency, config.mode_latency_slack, config.max_latency, trusted)
        report = ModeReport(config.sensitivity.value, len(probe.screen[0]), static, alone, candidates,
                            chosen, latency, why, len(probe.select[0]),
                            {name: verdict.improved_feeds for name, verdict in verdicts.items()},
                            alone_float)
        _apply(state, list(dict.fromkeys(free + float_free)), *layers[chosen], report)


def _apply(state: QuantState, free: list[str], dynamic: list[str], floating: list[str],
           report: ModeReport) -> None:
    """Make the chosen layers dynamic or float and say why each free layer has its mode."""
    whole = ", ".join(f"{name} {value:.3g}{_improved(report, name)} at "
                      f"{report.latency[name]:.2f}x float latency"
                      for name, value in report.candidates.items())
    reasons = {layer: (f"auto: {report.chosen} model chosen, {report.why} ({report.measure} of "
                       f"whole models on {report.selection_feeds} selection feeds: {whole}); this layer "
                       f"{_alone(report, layer)} vs all static {report.static_damage:.3g} "
                       f"on {report.feeds} screening feeds") for layer in free}
    plan = state.plan.with_dynamic({layer: reasons[layer] for layer in dynamic})
    plan = plan.with_float_activations({layer: reasons[layer] for layer in floating})
    state.qparams = qparams_for(state, plan)
    for layer in free:
        plan.static_reasons.pop(layer, None)
        if layer not in dynamic and layer not in floating:
            plan.static_reasons[layer] = reasons[layer]
    state.plan = plan
    state.reports["activation_modes"] = report


def _alone(report: ModeReport, layer: str) -> str:
    """This layer's screening damages: alone dynamic, alone float (those measured)."""
    parts = [f"alone {mode} {damages[layer]:.3g}" for mode, damages in
             (("dynamic", report.alone), ("float", report.alone_float)) if layer in damages]
    return ", ".join(parts)


def _improved(report: ModeReport, name: str) -> str:
    if name not in report.improved_feeds:
        return ""
    return f" ({report.improved_feeds[name]} of {report.selection_feeds} feeds better than static)"
