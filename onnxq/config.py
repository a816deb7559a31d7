"""Typed, frozen options of a quantization run, and their TOML form.

Every option a user can set lives in `QuantConfig`. Values are validated in `__post_init__`, so
an invalid config cannot exist. Granularity is a type (`PerTensor`, `PerChannel`), not a
string (`PerGroup(size)`: one scale per `size` consecutive weights along the reduction axis).
A TOML config file loads into the same dataclass (`load_config`) and saves back to the
same text (`dump_config`); unknown keys are an error, never ignored.

Precedence: command-line flags > config file > these defaults.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from dataclasses import dataclass, field
from pathlib import Path

from onnxq.cpu import u8s8_saturates
from onnxq.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class CalibrationMethod(enum.Enum):
    """How an activation tensor's clipping range is chosen from its streamed statistics."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class WeightMethod(enum.Enum):
    """How weight codes and scales are chosen: round to nearest, or COMQ's search."""

    RTN = "rtn"
    COMQ = "comq"


class ScaleSearch(enum.Enum):
    """Search of activation scales after they are set from statistics: none, or Evol-Q's
    evolutionary search scored through ORT block by block (onnxq.stages.evolq)."""

    NONE = "none"
    EVOLQ = "evolq"


class LossScope(enum.Enum):
    """Where a scale candidate's loss is measured: on the model outputs (the candidate's block
    and everything after it run) or on its block's output alone."""

    GLOBAL = "global"
    LOCAL = "local"


class FeedWeighting(enum.Enum):
    """How a scale search's loss weighs the calibration feeds: pooled (the error energy of all
    feeds over their signal energy: a loud or badly fitted feed weighs more) or equal (the mean
    over feeds of each feed's own relative loss: every feed counts the same)."""

    POOLED = "pooled"
    EQUAL = "equal"


class SearchedScales(enum.Enum):
    """Which scales the Evol-Q search moves: the activation groups' scales, one multiplier per
    quantized weight (its codes kept: what the weight searcher chose stays), or both."""

    ACTIVATIONS = "activations"
    WEIGHTS = "weights"
    BOTH = "both"
    AUTO = "auto"  # activations and weights searched apart; the held-out feeds pick


class SearchGraph(enum.Enum):
    """What a scale candidate is scored on: the fused graph (the model the emitter writes with
    the candidate's constant scales, run as ORT optimizes it: integer kernels such as
    QLinearConv) or the lifted graph (one session with the scales as inputs, which ORT cannot
    fuse: it runs every DequantizeLinear -> float op -> QuantizeLinear as written)."""

    FUSED = "fused"
    LIFTED = "lifted"


class Strategy(enum.Enum):
    """How candidates are proposed: evolution (tournament selection, crossover, mutation with a
    shrinking step, elitism) or random sampling with the same number of evaluations (the
    baseline that shows whether selection helps)."""

    EVOLUTION = "evolution"
    RANDOM = "random"


class DamageMeasure(enum.Enum):
    """How the damage of a quantized model's outputs against float's is measured
    (onnxq.scoring.damage defines each)."""

    MSE = "mse"
    KL = "kl"
    INFONCE = "infonce"


class SensitivityBase(enum.Enum):
    """What a layer's sensitivity probe starts from: the float model, or the 8-bit quantized one."""

    FLOAT = "float"
    QUANTIZED = "quantized"


class Allocator(enum.Enum):
    """Where the allocator's per-layer damage comes from: measured, or random (a baseline)."""

    SENSITIVITY = "sensitivity"
    RANDOM = "random"


class ActivationType(enum.Enum):
    """Integer type of quantized activations: uint8 asymmetric or int8 symmetric."""

    UINT8 = "uint8"
    INT8 = "int8"

    @property
    def symmetric(self) -> bool:
        return self is ActivationType.INT8


class ActivationMode(enum.Enum):
    """How the activations feeding the weight layers are quantized.

    static: one scale and zero point per tensor, fixed from calibration statistics (ORT fuses
    Q/DQ into QLinearConv, QGemm, MatMulIntegerToFloat). dynamic: scale and zero point of each
    batch computed at run time (DynamicQuantizeLinear, uint8 asymmetric) in front of an integer
    MatMul (onnxq.passes.dynamic_quantize); needs no calibration data. auto: static, dynamic
    (MatMul / Gemm) or float inputs (any layer, its weight still quantized) chosen per layer by
    measured damage on calibration data and measured latency (onnxq.stages.activation_modes).
    """

    STATIC = "static"
    DYNAMIC = "dynamic"
    AUTO = "auto"


@dataclass(frozen=True)
class PerTensor:
    """One scale (and zero point) for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along the op's output-channel axis (resolved per op by the plan)."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per `size` consecutive weights along the op's reduction (input) axis, per
    output channel: MatMul (K, N) along K, Gemm along K (per transB), Conv (O, I, kh, kw) along
    I * kh * kw flattened, a Gather table along each row. The last group of a row may be
    partial. Resolved per weight by the plan (onnxq.plan.WeightQuant.group_size)."""

    size: int

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 2:
            raise ConfigError(f"group size must be an integer >= 2, got {self.size!r}")


Granularity = PerTensor | PerChannel | PerGroup

_GRANULARITY_NAMES: dict[str, Granularity] = {
    "per_tensor": PerTensor(),
    "per_channel": PerChannel(),
}

# Group size of weights below 8 bits when `weight_group_size` is not set: chosen by held-out
# calibration fidelity on the zoo (benchmarks/results/groupwise.md).
DEFAULT_GROUP_SIZE = 64


def granularity_name(granularity: Granularity) -> str:
    if isinstance(granularity, PerGroup):
        return f"per_group({granularity.size})"
    return next(k for k, v in _GRANULARITY_NAMES.items() if v == granularity)


def parse_granularity(text: object) -> Granularity:
    """`per_tensor`, `per_channel` or `per_group(N)` (N >= 2) as a granularity type."""
    if isinstance(text, str) and text in _GRANULARITY_NAMES:
        return _GRANULARITY_NAMES[text]
    if isinstance(text, str) and text.startswith("per_group(") and text.endswith(")"):
        size = text[len("per_group("):-1].strip()
        if not size.isdigit():
            raise ConfigError(f"weight_granularity = {text!r}: the group size must be an integer >= 2")
        return PerGroup(int(size))
    raise ConfigError(f"weight_granularity = {text!r} is not one of: "
                      f"{', '.join(_GRANULARITY_NAMES)}, per_group(N)")


def parse_group_size(text: object) -> int:
    """A `--group-size` / `weight_group_size` value: an integer >= 2, or 0 (per channel)."""
    value = text.strip() if isinstance(text, str) else text
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or (value != 0 and value < 2):
        raise ConfigError(f"group size must be an integer >= 2 (or 0 for per-channel scales), got {text!r}")
    return value


ALLOCATION_BUDGETS = ("avg_bits", "max_size_mb", "max_size_ratio", "max_bops", "max_drop")


@dataclass(frozen=True)
class ComqConfig:
    """Settings of the COMQ search: the weight searcher's typed config (its searcher is
    onnxq.weights.search_comq; the `[comq]` table of a TOML config).

    Attributes:
        sweeps: passes over all coordinates (each followed by a scale update when enabled).
        greedy_order: visit coordinates by decreasing |w_j| * ||X_j||; else in index order.
        update_scales: alternate code sweeps with closed-form scale updates.
        scale_candidates: initial per-row scales tried (fractions of the min-max scale); the
            one with the lowest error (after rounding to nearest) starts the search.
        damping: lambda added to H's diagonal, relative to its mean (H + lambda mean(diag H) I).
            Beyond numerical safety it is a ridge prior: the calibration inputs leave many
            directions of a late layer barely seen (EfficientNet-Lite0's classifier sees 60
            input vectors for 1280 inputs), and noise from upstream quantization adds about
            sigma^2 I to the H a quantized model's inputs would give. Measured at W4A8
            (asymmetric Conv rows, GPTQ start), EfficientNet-Lite0 top-1 agreement / logit
            cosine: 0.42 / 0.83 at 1e-6 (no GPTQ start), 0.55 / 0.91 at 0.1, 0.65 / 0.92 at 0.3,
            0.55 / 0.90 at 1.0; PP-OCR exact_hard 0.33-0.35 at 0.1-0.3, 0.27 at 1.0.
        block: coordinates per block of a sweep (speed only; the result does not depend on it).
        gptq_start: also round each row GPTQ's way (coordinates in the visiting order, each
            rounding error compensated on the coordinates not yet rounded through the Cholesky
            factor of H^-1) and start from those codes where they beat round to nearest at the
            starting scale. Lowers the final error by about a sixth on EfficientNet-Lite0's layers.
        asymmetric_ops: op types whose rows below 8 bits get an integer zero point (searched with
            the scale; 8-bit rows stay symmetric for ORT's fast integer kernels);
            the others stay symmetric. BN-folded Conv weights are skewed (EfficientNet-Lite0
            W4A8 logit cosine 0.86 -> 0.90); MatMul weights, after SmoothQuant, are not (MiniLM
            cosine 0.968 symmetric, 0.962 asymmetric), and a symmetric MatMul weight keeps
            MatMulNBits' implied zero point. Read by onnxq.weights.search_comq; `comq()` itself takes
            symmetry as an argument.
        float_target_ridge: with `comq_sequential`, lambda of the float targets
            t = (H + lambda mean(diag H) I)^-1 (C w + lambda mean(diag H) w)
            (onnxq.weights.float_targets): how far a target may leave the float weight along
            directions the calibration inputs barely see. Must be positive.
    """

    sweeps: int = 3
    greedy_order: bool = True
    update_scales: bool = True
    scale_candidates: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    damping: float = 0.3
    block: int = 128
    gptq_start: bool = True
    asymmetric_ops: tuple[str, ...] = ("Conv", "Gemm")
    float_target_ridge: float = 0.3

    def __post_init__(self) -> None:
        for name in ("scale_candidates", "asymmetric_ops"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"comq {name} must be a list")
            object.__setattr__(self, name, tuple(value))
        if self.block < 1:
            raise ConfigError(f"comq block must be >= 1, got {self.block}")
        if self.sweeps < 0:
            raise ConfigError(f"comq sweeps must be >= 0, got {self.sweeps}")
        if not self.scale_candidates or any(not 0 < c <= 1.5 for c in self.scale_candidates):
            raise ConfigError("comq scale_candidates must be fractions in (0, 1.5]")
        if self.damping < 0:
            raise ConfigError(f"comq damping must be >= 0, got {self.damping}")
        ridge = self.float_target_ridge
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
            raise ConfigError(f"comq float_target_ridge must be > 0, got {self.float_target_ridge}")


@dataclass(frozen=True)
class EvolqConfig:
    """Settings of the Evol-Q scale search (the `[evolq]` table of a TOML config).

    Attributes:
        budget: candidate evaluations of one search over all blocks and passes (scales = auto
            runs two searches, each with this budget); on the fused graph each is the whole
            model on the search feeds, on the lifted graph a block and what follows it (global)
            or the block (local). 240 with 6 blocks: 40 per block.
        passes: sweeps over the blocks, first to last.
        population: candidates per generation.
        elite: best candidates kept unchanged into the next generation.
        tournament: candidates drawn per tournament (selection of each parent).
        sigma: initial mutation step in log-scale (0.05: scales move by about 5%).
        final_sigma: the step shrinks geometrically to this over a block's generations; equal
            to sigma (the default) keeps it constant. Chosen on calibration data: with about 38
            evaluations per block, a step shrinking to 0.005 refined around an early incumbent
            and random search at a constant 0.05 beat it on the selection feeds of PP-OCRv4 (MSE
            0.0134 against 0.0163) and the digit CNN (2.85e-5 against 3.67e-5); evolution at a
            constant 0.05 beat both on PP-OCRv4 (0.0129) and the shrinking step on the digits
            (3.03e-5). A step halved after each generation that found nothing better did worse
            on both (0.0200; 3.85e-5).
        loss: mse (default), infonce (contrastive across the batch, as in Evol-Q) or kl on the
            outputs. Chosen on calibration data alone: with infoNCE (32 search feeds) every
            block's best candidate on EfficientNet-Lite0 W8A8 raised the loss on the selection
            feeds (40-100%), so none was kept; with MSE (44 search feeds) 4 of 6 blocks lowered
            it (selection MSE -11%), and on PP-OCRv4 the first block's selection MSE halved.
        scope: global (model outputs) or local (the block's output; lifted graph only).
        graph: fused (the default; lifted when scope is local) or lifted
            (onnxq.config.SearchGraph): whether a candidate is scored on the model ORT runs
            once it is written (fused: a session per candidate, the whole model on the search
            feeds) or on one session with the scales as inputs, from the block's cached input
            (lifted: no session per candidate, but not what ORT runs: on PP-OCRv4 the two differ
            by more than the moves the search compares). Chosen on the held-out calibration
            feeds (benchmarks/results/evolq.md).
        feed_weighting: pooled (default) or equal: how the search loss weighs the search feeds
            (onnxq.config.FeedWeighting; equal runs the feeds one by one, and needs mse or kl).
        strategy: evolution, or random search with the same evaluations (ablation).
        scales: what the search moves: activations (the groups' scales), weights (one
            multiplier per quantized weight, codes kept), both (per block, its activation
            scales then its weight multipliers, sharing the block's evaluations) or auto (two
            searches from the base, one per kind, each with the whole budget; the held-out
            calibration feeds choose between them and the base; the default). See
            onnxq.search.graph. Why auto: on the zoo (fused graph) the held-out feeds preferred
            activation scales on EfficientNet-Lite0 W8A8 and MiniLM-L6 W4A8 and weight
            multipliers on EfficientNet-Lite0 W4A8 and PP-OCRv4 (both widths); no one kind
            improved every model (benchmarks/results/evolq.md). It costs the two searches.
        weight_sigma: the mutation step of a weight's log-multiplier (sigma is the activation
            scales'; a weight's step keeps their ratio when sigma shrinks).
        search_feeds: calibration feeds the candidates are scored on.
        selection_feeds: other calibration feeds a block's best candidate must also improve
            on to be kept: their pooled loss and the own loss of a strict majority of them
            (onnxq.search.keep; selection never sees evaluation data). After the search, the
            searched scales are written only if the held-out calibration feeds find the model at
            least as close to float as with the base scales (onnxq.stages.evolq).
        min_block_groups: activation groups per block at least (blocks are merged up to it).
        max_blocks: blocks at most (merged down to it).
    """

    budget: int = 240
    passes: int = 1
    population: int = 8
    elite: int = 2
    tournament: int = 3
    sigma: float = 0.05
    final_sigma: float = 0.05
    loss: DamageMeasure = DamageMeasure.MSE
    scope: LossScope = LossScope.GLOBAL
    graph: SearchGraph | None = None  # fused; lifted with scope = local
    feed_weighting: FeedWeighting = FeedWeighting.POOLED
    strategy: Strategy = Strategy.EVOLUTION
    scales: SearchedScales = SearchedScales.AUTO
    weight_sigma: float = 0.01
    search_feeds: int = 48
    selection_feeds: int = 16
    min_block_groups: int = 2
    max_blocks: int = 6

    def __post_init__(self) -> None:
        for name, enum_type in (("loss", DamageMeasure), ("scope", LossScope), ("strategy", Strategy),
                                ("feed_weighting", FeedWeighting), ("scales", SearchedScales)):
            object.__setattr__(self, name, _enum_value(f"evolq {name}", enum_type, getattr(self, name)))
        graph = self.graph if self.graph is not None else \
            SearchGraph.LIFTED if self.scope is LossScope.LOCAL else SearchGraph.FUSED
        object.__setattr__(self, "graph", _enum_value("evolq graph", SearchGraph, graph))
        if self.feed_weighting is FeedWeighting.EQUAL and self.loss is DamageMeasure.INFONCE:
            raise ConfigError("evolq feed_weighting = equal needs loss mse or kl (infoNCE contrasts "
                              "the rows of all feeds together)")
        if self.graph is SearchGraph.FUSED and self.scope is LossScope.LOCAL:
            raise ConfigError("evolq scope = local needs graph = lifted (the fused graph is scored "
                              "on the model outputs)")
        for name in ("budget", "passes", "population", "tournament", "search_feeds", "min_block_groups",
                     "max_blocks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"evolq {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.elite < self.population:
            raise ConfigError(f"evolq elite must be in [0, population), got {self.elite}")
        if self.selection_feeds < 0:
            raise ConfigError(f"evolq selection_feeds must be >= 0, got {self.selection_feeds}")
        if not 0 < self.weight_sigma <= 1:
            raise ConfigError(f"evolq weight_sigma must be in (0, 1], got {self.weight_sigma}")
        if not 0 < self.final_sigma <= self.sigma <= 1:
            raise ConfigError(f"evolq needs 0 < final_sigma <= sigma <= 1, got {self.final_sigma}, "
                              f"{self.sigma}")
        if self.budget < self.population:
            raise ConfigError(f"evolq budget ({self.budget}) must cover one population ({self.population})")


@dataclass(frozen=True)
class RtnConfig:
    """Round to nearest (onnxq.weights.rtn) has no settings."""


def _split_rule(text: object, form: str) -> tuple[str, str]:
    """A `--layer` rule's pattern and its lower-cased value (after the last "=")."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"layer rule {text!r} is not {form}")
    pattern, _, value = text.rpartition("=")
    pattern, value = pattern.strip(), value.strip().lower()
    if not pattern:
        raise ConfigError(f"layer rule {text!r} has an empty pattern")
    return pattern, value


@dataclass(frozen=True)
class LayerRule:
    """One `PATTERN=BITS` rule: layers matching `pattern` get `bits` (None: stay float)."""

    pattern: str
    bits: int | None

    @classmethod
    def parse(cls, text: str) -> LayerRule:
        pattern, bits = _split_rule(text, "PATTERN=BITS")
        if bits == "float":
            return cls(pattern, None)
        if bits not in ("2", "3", "4", "8"):
            raise ConfigError(f"layer rule {text!r}: bits must be 2, 3, 4, 8 or float")
        return cls(pattern, int(bits))


@dataclass(frozen=True)
class ModeRule:
    """One `PATTERN=static|dynamic` rule: the activations of the layers matching `pattern`."""

    pattern: str
    mode: ActivationMode

    @classmethod
    def parse(cls, text: str) -> ModeRule:
        pattern, mode = _split_rule(text, "PATTERN=static or PATTERN=dynamic")
        if mode not in (ActivationMode.STATIC.value, ActivationMode.DYNAMIC.value):
            raise ConfigError(f"layer rule {text!r}: activations must be static or dynamic")
        return cls(pattern, ActivationMode(mode))

    @staticmethod
    def is_mode_rule(text: str) -> bool:
        """Whether a `--layer` value sets activations (else it sets bits)."""
        return isinstance(text, str) and text.rpartition("=")[2].strip().lower() in (
            ActivationMode.STATIC.value, ActivationMode.DYNAMIC.value, ActivationMode.AUTO.value)


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides how a model is quantized.

    Attributes:
        method: calibration method for activation ranges.
        percentile: the percentile kept by the percentile method.
        activation_type: uint8 asymmetric (default) or int8 symmetric activations (static
            ones: dynamic activations are always uint8 asymmetric, DynamicQuantizeLinear's type).
        activations: "static" (default), "dynamic" or "auto" (ActivationMode). dynamic: every
            MatMul / Gemm with a constant 2-D weight quantizes its input per batch at run time;
            the other layers are static with calibration data and stay float without it (a
            dynamic run needs no data). auto: each such layer static or dynamic, and any
            quantized layer static or with float inputs (weight-only), whichever damages the
            outputs least on calibration feeds within `mode_latency_slack` of the fastest.
        layer_activations: per-layer "PATTERN=static|dynamic" rules (PATTERN as in
            `exclude`), matched among the layers that can take dynamic activations; the last
            matching rule wins over `activations`; one that matches no such layer is an error.
            `exclude` and `layer_bits` "=float" rules come first (those layers stay float).
        weight_granularity: per-channel (default) or per-tensor symmetric weights, or
            PerGroup(size): group-wise scales for every weight, 8-bit ones included.
        weight_group_size: with per-channel granularity, the group size of weights below 8
            bits (one scale per that many consecutive weights along the reduction axis;
            `--group-size N`); 0 keeps them per channel. 8-bit weights stay per channel (ORT's
            integer QLinearConv / QGemm / MatMulInteger kernels take per-channel scales only)
            unless the granularity is PerGroup. Default `DEFAULT_GROUP_SIZE`.
        weight_bits: bits of every quantized weight: 8, 4, 3 or 2 (3-4 bit codes are stored
            as int4 at opset 21, 2-bit codes as int2 at opset 25, or in MatMulNBits with
            bits=4 / bits=2; onnxq.passes.insert_qdq).
        short_row_bits: weights that `weight_bits` puts below this many bits but whose rows
            are no longer than one group (depthwise Convs' 9 or 25 weights, 1x1 Convs over
            few channels: per-channel scales are all a group could give them) get this many
            instead; 0 keeps them at `weight_bits`. Rules and the allocator (which measures
            each layer) decide for themselves. Default 8: on EfficientNet-Lite0 W4A8 COMQ at
            group size 64 those layers are 4% of the weights; at 8 bits the held-out
            calibration cosine rose 0.973 -> 0.988 for a file 0.159x -> 0.165x of float.
        reduce_range: 8-bit weights keep to 7-bit codes ([-64, 63] in int8), so that ONNX
            Runtime's x86 integer kernels without VNNI (AVX2: u8 x s8 pairs summed in int16)
            cannot saturate (onnxq.cpu). None (default): on when the CPU quantizing the model
            is such a CPU (small CNN W8A8 output cosine 0.92 -> 0.9999 on an AVX2 EPYC); set it
            for the machine that will run the model when that is another.
        weight_method: round to nearest (rtn) or COMQ's coordinate-wise search (per channel
            only).
        comq: settings of the COMQ search (`[comq]` table in TOML; used when weight_method is
            comq).
        comq_sequential: after the weights stage, COMQ searches every layer again, in graph
            order, on the inputs it sees in the model quantized so far and toward the float
            model's outputs, its bias absorbing the mean shift (onnxq.stages.sequential_comq;
            the ridge is `[comq] float_target_ridge`). On by default: at W4A8 it raised the
            held-out calibration cosine of every zoo model whose base lost more than 0.001
            (EfficientNet-Lite0 0.9885 -> 0.9945, PP-OCRv4 0.9881 -> 0.9998, MiniLM-L6
            0.98272 -> 0.98286; the digit CNN, which loses 0.0001, 0.99991 -> 0.99985), for
            about 5-10x COMQ's time (a run of both models per wave of independent layers).
        layer_bits: per-layer weight bits as "PATTERN=BITS" rules (BITS 2, 3, 4, 8 or "float";
            PATTERN a node name, op type or glob over node names, as in `exclude`). Precedence:
            `exclude` first (always float), then the last rule that matches a layer, then the
            allocator's choice (when a budget is set), then `weight_bits`. A rule that matches
            no quantizable layer is an error. Layers set by a rule are not re-allocated.
        avg_bits: budget of the automatic allocation: mean weight bits over all quantized
            weights, weighted by their element counts.
        max_size_mb: budget of the automatic allocation: size of the written model in MB
            (10^6 bytes), everything included.
        max_size_ratio: budget of the automatic allocation: size of the written model as a
            fraction of the float model's (e.g. 0.15).
        max_bops: budget of the automatic allocation: bit operations, sum over layers of
            MACs * weight bits * activation bits, in units of 10^9 (GBOPs).
        max_drop: smallest model whose held-out fidelity stays within this drop of float
            (1 - the lowest output cosine), raising the bits of the most sensitive layers
            until it is met.
        candidate_bits: weight bits the allocator chooses from.
        sensitivity_base: what each layer's probe starts from: "float" (the float model: the
            layer's weight error alone) or "quantized" (8-bit weights and quantized
            activations, so activation rounding takes part). Measured at a 0.17x / 0.2x size
            budget: EfficientNet-Lite0 top-1 0.753 float / 0.760 quantized; PP-OCR hard 0.215
            / 0.0 (its W8A8 error swamps the per-layer differences), hence float.
        sensitivity_feeds: calibration feeds the sensitivity of each layer is measured on.
        mode_feeds: calibration feeds `activations = auto` measures each layer's damage on
            (static against dynamic; the damage measure is `sensitivity`).
        mode_latency_slack: `activations = auto` takes the least damaging whole candidate
            (all static, all dynamic, the layers that helped alone) among those whose measured
            latency is within this much (of the float model's latency) of the fastest: 0.05, so
            a candidate 5% of float slower counts as fast as the fastest (a shared machine's
            noise), one 13% slower does not.
        max_latency: the written model's latency as a ratio to the float model's (p50 through
            ORT on a held-out feed, `latency_threads` threads). A budget of the bit allocation
            (alone: the least damaging bits that run fast enough; with a size or bits budget:
            both met), each layer's time per bit-width measured from ORT's profile and the
            chosen model timed (onnxq.stages.allocate); and of `activations = auto`'s choice
            (candidates over it are not taken; none under it: the fastest, and the card says
            so). With `activations = auto` and no size or bits budget it budgets the modes only.
        latency_threads: intra-op threads latency is measured with (the deployment's).
        measure_latency: time the written model against the float model (interleaved rounds
            on a held-out feed) for the summary; when it is slower, name the layers ORT's profile
            blames. Not written to the card (a timing belongs to the machine, not the model).
        allocator: "sensitivity" (measured damage) or "random" (random damage, same budget and
            solver: a baseline for the measured signal).
        sensitivity: the damage measure of quantizing one layer: "mse" (output error energy
            over output energy), "kl" (softmax KL divergence over the last axis) or "infonce"
            (contrastive loss of quantized against float outputs across feeds).
        matmul_nbits: write MatMul weights of 2 to 4 bits as com.microsoft MatMulNBits
            (ORT's block kernel: bits=4, or bits=2 for 2-bit codes) rather than
            DequantizeLinear -> MatMul, which ORT runs as a float MatMul after dequantizing
            the weight on every run (MiniLM W4: 2.3x faster at sequence 128, and as accurate).
        conv_storage: how Conv weights below 8 bits are written: "compact" (default: int4
            codes, group-wise scales; the smallest file, but ORT 1.32 has no integer kernel
            for them, so each runs as a float Conv behind a DequantizeLinear of its weight on
            every run) or "fast" (the same codes per channel in an int8 container: ORT's
            QLinearConv, 8-bit speed and size, 4-bit accuracy). A choice of layout only.
        nbits_accuracy_level: MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16,
            4 int8 compute).
        quantize_gather: quantize constant embedding tables read by Gather (per row).
        exclude: node names, op types or fnmatch patterns of node names kept float. Each entry
            must match at least one node. An op type matches by equality (e.g. "Softmax"); a
            node name by equality or by glob pattern ("*attention*").
        quantize_activation_matmul: also quantize MatMuls whose both operands are activations
            (attention scores and context in transformers).
        close_float_islands: quantize the float inputs of a join (Add, Mul, Concat) whose
            output and other inputs are quantized, so that ORT runs its integer kernel instead
            of a float op between a DequantizeLinear and a QuantizeLinear (passes/annotate.py).
        smooth: apply SmoothQuant to the inputs of MatMuls with constant weights (moves
            per-channel activation outliers into the weights; exact in float).
        smooth_alpha: SmoothQuant's migration strength, in [0, 1]. None (default): 0.8 with
            8-bit weights, 0.5 below (moving outliers into 4-bit weights costs more than it
            saves: MiniLM W4A8 cosine 0.83 at 0.8, 0.91 at 0.5, round to nearest).
        equalize: even out the channel ranges of Conv activations whose neighbours can take a
            per-channel factor (a Conv producing them, a constant Mul or Add on either side, a
            depthwise Conv reading them); exact in float, no new nodes (passes/equalize.py).
        equalize_alpha: where a dense Conv reads such an activation, the share of its channel
            spread moved into that Conv's weights (SmoothQuant's alpha, in [0, 1]; 0: leave
            dense Conv inputs alone). 0.5, SmoothQuant's own default: on PP-OCRv4 W8A8 it raised
            the held-out top-1 agreement on calibration feeds 0.976 -> 0.978 over equalizing
            without dense Convs (benchmarks/results/evolq.md has the evaluation figures).
        bias_correction: fold the mean output shift caused by weight rounding into the biases
            of Conv and Gemm nodes (b - (W_q - W) E[x], E[x] from calibration).
        holdout: calibration feeds held out of statistics and used to measure fidelity.
        max_feeds: use at most this many calibration feeds (None: all).
        seed: seed of every random choice (which feeds are held out).
        min_cosine: fail verification (nothing written) when an output's cosine to float on
            held-out feeds falls below this. None: report only.
        search: search activation scales after calibration: "none" or "evolq" (Evol-Q,
            settings in `evolq`).
        evolq: settings of the Evol-Q search (`[evolq]` table in TOML).
        workers: processes that score search candidates in parallel (1: in this process).
        executor: where the workers run: "local" (processes on this machine) or "ray" (a Ray
            cluster at $RAY_ADDRESS, else a local Ray instance; needs `onnxq[ray]`).
        provider: ONNX Runtime execution provider for calibration and scoring: "cpu" or "cuda"
            (onnxruntime-gpu).
    """

    method: CalibrationMethod = CalibrationMethod.MSE
    percentile: float = 99.999
    activation_type: ActivationType = ActivationType.UINT8
    activations: ActivationMode = ActivationMode.STATIC
    layer_activations: tuple[str, ...] = ()
    weight_granularity: Granularity = field(default_factory=PerChannel)
    weight_group_size: int = DEFAULT_GROUP_SIZE
    weight_bits: int = 8
    short_row_bits: int = 8
    reduce_range: bool | None = None
    weight_method: WeightMethod = WeightMethod.RTN
    comq: ComqConfig = field(default_factory=ComqConfig)
    comq_sequential: bool = True
    layer_bits: tuple[str, ...] = ()
    avg_bits: float | None = None
    max_size_mb: float | None = None
    max_size_ratio: float | None = None
    max_bops: float | None = None
    max_drop: float | None = None
    candidate_bits: tuple[int, ...] = (2, 3, 4, 8)
    sensitivity: DamageMeasure = DamageMeasure.MSE
    sensitivity_feeds: int = 8
    mode_feeds: int = 32
    mode_latency_slack: float = 0.05
    max_latency: float | None = None
    latency_threads: int = 1
    measure_latency: bool = True
    sensitivity_base: SensitivityBase = SensitivityBase.FLOAT
    allocator: Allocator = Allocator.SENSITIVITY
    matmul_nbits: bool = True
    conv_storage: str = "compact"
    nbits_accuracy_level: int = 4
    quantize_gather: bool = True
    exclude: tuple[str, ...] = ()
    quantize_activation_matmul: bool = True
    close_float_islands: bool = True
    smooth: bool = True
    smooth_alpha: float | None = None
    equalize: bool = True
    equalize_alpha: float = 0.5
    bias_correction: bool = True
    holdout: int = 4
    max_feeds: int | None = None
    seed: int = 0
    min_cosine: float | None = None
    search: ScaleSearch = ScaleSearch.NONE
    evolq: EvolqConfig = field(default_factory=EvolqConfig)
    workers: int = 1
    executor: str = "local"
    provider: str = "cpu"

    def __post_init__(self) -> None:
        for name, enum_type in _ENUM_FIELDS.items():  # plain values (as TOML gives them) too
            object.__setattr__(self, name, _enum_value(name, enum_type, getattr(self, name)))
        self._check_search_options()
        self._check_latency_options()
        if self.conv_storage not in ("compact", "fast"):
            raise ConfigError(f"conv_storage must be compact or fast, got {self.conv_storage!r}")
        if not isinstance(self.comq, ComqConfig):
            raise ConfigError(f"comq must be a ComqConfig, got {self.comq!r}")
        if not isinstance(self.method, CalibrationMethod):
            raise ConfigError(f"method must be a CalibrationMethod, got {self.method!r}")
        if not isinstance(self.activation_type, ActivationType):
            raise ConfigError(f"activation_type must be an ActivationType, got {self.activation_type!r}")
        if not isinstance(self.weight_granularity, (PerTensor, PerChannel, PerGroup)):
            raise ConfigError(f"weight_granularity must be PerTensor(), PerChannel() or PerGroup(size), "
                              f"got {self.weight_granularity!r}")
        parse_group_size(self.weight_group_size)
        if self.weight_bits not in (2, 3, 4, 8):
            raise ConfigError(f"weight_bits must be 2, 3, 4 or 8, got {self.weight_bits}")
        if not isinstance(self.weight_method, WeightMethod):
            raise ConfigError(f"weight_method must be a WeightMethod, got {self.weight_method!r}")
        if self.weight_method is WeightMethod.COMQ and isinstance(self.weight_granularity, PerTensor):
            raise ConfigError("weight_method comq needs per-channel weights")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if not 0.0 <= self.equalize_alpha <= 1.0:
            raise ConfigError(f"equalize_alpha must be in [0, 1], got {self.equalize_alpha}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.holdout < 0:
            raise ConfigError(f"holdout must be >= 0, got {self.holdout}")
        if self.max_feeds is not None and self.max_feeds < 1:
            raise ConfigError(f"max_feeds must be >= 1, got {self.max_feeds}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"min_cosine must be in [-1, 1], got {self.min_cosine}")
        if isinstance(self.exclude, str) or not all(isinstance(e, str) for e in self.exclude):
            raise ConfigError("exclude must be a list of strings")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for name in ("layer_bits", "candidate_bits", "layer_activations"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name} must be a list")
            object.__setattr__(self, name, tuple(value))
        _ = self.layer_rules  # parses and checks the rules
        _ = self.mode_rules
        if not self.candidate_bits or any(b not in (2, 3, 4, 8) for b in self.candidate_bits):
            raise ConfigError(f"candidate_bits must be among 2, 3, 4, 8, got {list(self.candidate_bits)}")
        budgets = [n for n in ALLOCATION_BUDGETS
                   if getattr(self, n) is not None]
        if len(budgets) > 1:
            raise ConfigError(f"set one allocation budget, not {' and '.join(budgets)}")
        for name in budgets:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_drop is not None and self.holdout < 1:
            raise ConfigError("max_drop needs held-out feeds to measure fidelity (holdout > 0)")
        if self.avg_bits is not None and not min(self.candidate_bits) <= self.avg_bits <= 8:
            raise ConfigError(f"avg_bits must be within the candidate bits "
                              f"[{min(self.candidate_bits)}, 8], got {self.avg_bits}")
        if isinstance(self.short_row_bits, bool) or self.short_row_bits not in (0, 2, 3, 4, 8):
            raise ConfigError(f"short_row_bits must be 0, 2, 3, 4 or 8, got {self.short_row_bits!r}")
        if self.sensitivity_feeds < 1:
            raise ConfigError(f"sensitivity_feeds must be >= 1, got {self.sensitivity_feeds}")
        if self.mode_feeds < 1:
            raise ConfigError(f"mode_feeds must be >= 1, got {self.mode_feeds}")
        if self.nbits_accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"nbits_accuracy_level must be 0 to 4, got {self.nbits_accuracy_level}")

    def _check_latency_options(self) -> None:
        if self.max_latency is not None and not self.max_latency > 0:
            raise ConfigError(f"max_latency must be > 0, got {self.max_latency}")
        if not self.mode_latency_slack >= 0:
            raise ConfigError(f"mode_latency_slack must be >= 0, got {self.mode_latency_slack}")
        if isinstance(self.latency_threads, bool) or not isinstance(self.latency_threads, int) \
                or self.latency_threads < 1:
            raise ConfigError(f"latency_threads must be an integer >= 1, got {self.latency_threads!r}")

    def _check_search_options(self) -> None:
        if not isinstance(self.evolq, EvolqConfig):
            raise ConfigError(f"evolq must be an EvolqConfig, got {self.evolq!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {self.workers!r}")
        if self.executor not in ("local", "ray"):
            raise ConfigError(f"executor must be local or ray, got {self.executor!r}")
        if self.provider not in ("cpu", "cuda"):
            raise ConfigError(f"provider must be cpu or cuda, got {self.provider!r}")

    @property
    def layer_rules(self) -> tuple[LayerRule, ...]:
        """`layer_bits` parsed, in order (the last matching rule wins)."""
        return tuple(LayerRule.parse(text) for text in self.layer_bits)

    @property
    def mode_rules(self) -> tuple[ModeRule, ...]:
        """`layer_activations` parsed, in order (the last matching rule wins)."""
        return tuple(ModeRule.parse(text) for text in self.layer_activations)

    def needs_calibration(self) -> list[str]:
        """What in this config needs calibration data (empty: it runs without)."""
        needs = []
        if self.activations is not ActivationMode.DYNAMIC:
            needs.append(f"activations = {self.activations.value}")
        if any(rule.mode is ActivationMode.STATIC for rule in self.mode_rules):
            needs.append("static layer rules")
        if self.weight_method is WeightMethod.COMQ:
            needs.append("weight_method = comq")
        if self.search is not ScaleSearch.NONE:
            needs.append(f"search = {self.search.value}")
        if self.allocation_budget is not None:
            needs.append(f"the {self.allocation_budget} budget")
        if self.min_cosine is not None:
            needs.append("min_cosine (fidelity is measured on held-out feeds)")
        return needs

    @property
    def allocation_budget(self) -> str | None:
        """The name of the allocation budget set, if any."""
        return next((n for n in ALLOCATION_BUDGETS
                     if getattr(self, n) is not None), None)

    @property
    def lowest_weight_bits(self) -> int:
        """The fewest bits any weight may get: `weight_bits`, the rules', and the allocator's
        candidates when a budget is set."""
        bits = [self.weight_bits, *(r.bits for r in self.layer_rules if r.bits is not None)]
        if self.allocation_budget is not None:
            bits.extend(self.candidate_bits)
        return min(bits)

    def group_size_at(self, bits: int) -> int:
        """The group size of a weight at `bits` (0: per channel or per tensor)."""
        if isinstance(self.weight_granularity, PerGroup):
            return self.weight_granularity.size
        if isinstance(self.weight_granularity, PerTensor) or bits >= 8:
            return 0
        return self.weight_group_size

    @property
    def effective_reduce_range(self) -> bool:
        """`reduce_range`, or whether this CPU's integer kernels would saturate when unset."""
        return u8s8_saturates() if self.reduce_range is None else self.reduce_range

    @property
    def weight_searcher(self) -> RtnConfig | ComqConfig:
        """The typed config of the weight searcher `weight_method` selects (its searcher is
        registered for that type in onnxq.weights)."""
        return self.comq if self.weight_method is WeightMethod.COMQ else RtnConfig()

    @property
    def effective_smooth_alpha(self) -> float:
        if self.smooth_alpha is not None:
            return self.smooth_alpha
        return 0.8 if self.lowest_weight_bits == 8 else 0.5

    def replace(self, **changes: object) -> QuantConfig:
        return dataclasses.replace(self, **changes)


# --- TOML form -------------------------------------------------------------------------------

_ENUM_FIELDS: dict[str, type[enum.Enum]] = {
    "method": CalibrationMethod, "activation_type": ActivationType, "weight_method": WeightMethod,
    "sensitivity": DamageMeasure, "sensitivity_base": SensitivityBase, "allocator": Allocator,
    "search": ScaleSearch, "activations": ActivationMode}
_TABLE_FIELDS: dict[str, type] = {"comq": ComqConfig, "evolq": EvolqConfig}


def _enum_value(key: str, enum_type: type[enum.Enum], value: object) -> enum.Enum:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum_type)
        raise ConfigError(f"{key} = {value!r} is not one of: {choices}") from None


def _table(key: str, table_type: type, value: object) -> object:
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a table ([{key}] in TOML)")
    known = {f.name for f in dataclasses.fields(table_type)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"unknown [{key}] key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return table_type(**value)
    except TypeError as error:
        raise ConfigError(f"invalid [{key}] table: {error}") from None


_BOOL_FIELDS = frozenset(f.name for f in dataclasses.fields(QuantConfig) if f.type in (bool, "bool"))


def config_from_dict(values: dict[str, object]) -> QuantConfig:
    """Build a config from plain values (as TOML gives them); unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(QuantConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs: dict[str, object] = {}
    for key, value in values.items():
        if key in _ENUM_FIELDS:
            value = _enum_value(key, _ENUM_FIELDS[key], value)
        elif key in _TABLE_FIELDS:
            value = _table(key, _TABLE_FIELDS[key], value)
        elif key == "weight_granularity":
            value = parse_granularity(value)
        elif key == "weight_group_size":
            value = parse_group_size(value)
        elif key in ("exclude", "layer_bits", "candidate_bits", "layer_activations"):
            if not isinstance(value, list):
                raise ConfigError(f"{key} must be a list")
            value = tuple(value)
        elif key in _BOOL_FIELDS and not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        kwargs[key] = value
    try:
        return QuantConfig(**kwargs)
    except TypeError as error:
        raise ConfigError(f"invalid config: {error}") from None


def config_to_dict(config: QuantConfig) -> dict[str, object]:
    """Plain values of a config, the inverse of `config_from_dict`; None values are left out."""
    values: dict[str, object] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        if f.name in _TABLE_FIELDS:
            value = {k: list(v) if isinstance(v, tuple) else v.value if isinstance(v, enum.Enum) else v
                     for k, v in dataclasses.asdict(value).items()}
        elif isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, (PerTensor, PerChannel, PerGroup)):
            value = granularity_name(value)
        elif isinstance(value, tuple):
            value = list(value)
        values[f.name] = value
    return values


def load_config(path: str | Path) -> QuantConfig:
    """Read a TOML config file into a `QuantConfig`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config {path} is not valid TOML: {error}") from None
    return config_from_dict(values)


def _toml_string(text: str) -> str:
    """A TOML basic string: backslash, quote and every control character escaped."""
    escaped = []
    for char in text:
        if char in ('"', "\\"):
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_config(config: QuantConfig) -> str:
    """The TOML text of a config; `load_config` of it gives the same config back."""
    values = config_to_dict(config)
    tables = {k: values.pop(k) for k in _TABLE_FIELDS if k in values}
    lines = [f"{k} = {_toml_value(v)}\n" for k, v in values.items()]
    for name, table in tables.items():
        lines.append(f"\n[{name}]\n")
        lines.extend(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
    return "".join(lines)
