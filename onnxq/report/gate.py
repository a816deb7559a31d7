"""Quality gates for a quantized model: the checks behind `onnxq check`.

A release pipeline quantizes a new float model, checks it against thresholds and against the
last release, and fails the build when it regresses. Each check here is one named pass/fail
with the value measured and the limit it was held to:

    min-cosine OUTPUT      mean cosine to float on the feeds                   >= X
    max-drop OUTPUT        the output's drop (below)                           <= D
    max-size-ratio         bytes on disk (external data included), quantized / float <= S
    max-latency-ratio      p50 latency in ORT, quantized / float, alternating rounds <= R
    baseline OUTPUT        drop minus the baseline model's drop on the same feeds   <= E
    card: model / float model / data / fidelity   the files are the ones the card names
                           (sha256), and the fidelity re-measured on the card's held-out
                           feeds is within E of the recorded one

An output's drop follows its measure: `cosine` 1 - mean cosine (the default for every output);
`top1` 1 - top-1 agreement (class scores: argmax over the last axis of an (N, C) or (N, T, C)
output, onnxq.scoring.fidelity); `sqnr` the noise-to-signal power ratio 10^(-SQNR/10), about
twice 1 - cosine for small errors. Top-1 is never chosen on its own: a logit vector's argmax
flips on near-ties that a deployment may not care about, and an embedding's or a heatmap's
argmax means nothing; name it per output where it is the metric (`--metric logits=top1`).

Works on any QDQ model (onnxq's, ORT's, NNCF's) with the float model's inputs and outputs.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxq import model_io
from onnxq.data import CalibrationSet, Feed, open_calibration
from onnxq.errors import ConfigError
from onnxq.report.bench import BenchSettings, alternating_p50_ms, model_file_bytes
from onnxq.report.compare import check_same_interface
from onnxq.report.provenance import ModelDigest, feeds_sha256, model_digest
from onnxq.scoring.fidelity import FidelityReport, OutputFidelity
from onnxq.scoring.scorer import Reference, Scorer

DEFAULT_MAX_FEEDS = 16
DEFAULT_MAX_REGRESSION = 0.002


class Measure(enum.Enum):
    COSINE = "cosine"
    TOP1 = "top1"
    SQNR = "sqnr"


@dataclass(frozen=True)
class GateSettings:
    """Thresholds (None: not checked) and how to measure.

    Attributes:
        metrics: (output name, measure) pairs; outputs not named are measured by cosine.
        max_regression: how far an output's drop may exceed the baseline's, and how far a
            card's recorded fidelity may differ from the re-measured one.
        max_feeds: feeds measured (the first ones of the data; a card's held-out feeds).
        latency_rounds, latency_runs: alternating rounds of timed runs of each model.
    """

    min_cosine: float | None = None
    max_drop: float | None = None
    max_size_ratio: float | None = None
    max_latency_ratio: float | None = None
    max_regression: float = DEFAULT_MAX_REGRESSION
    metrics: tuple[tuple[str, Measure], ...] = ()
    max_feeds: int = DEFAULT_MAX_FEEDS
    threads: int = 1
    latency_rounds: int = 5
    latency_runs: int = 10

    def __post_init__(self) -> None:
        for name in ("min_cosine", "max_drop", "max_size_ratio", "max_latency_ratio"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if self.min_cosine is not None and self.min_cosine > 1:
            raise ConfigError(f"--min-cosine must be at most 1, got {self.min_cosine}")
        if not (np.isfinite(self.max_regression) and self.max_regression >= 0):
            raise ConfigError(f"--max-regression must be a number >= 0, got {self.max_regression}")
        for name in ("max_feeds", "threads", "latency_rounds", "latency_runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def measure_of(self, output: str) -> Measure:
        return dict(self.metrics).get(output, Measure.COSINE)


@dataclass(frozen=True)
class CheckResult:
    """One gate: its name, whether it passed, the value measured and the limit."""

    name: str
    passed: bool
    value: float | str | None
    limit: float | str | None
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "passed": self.passed, "value": self.value, "limit": self.limit,
                "detail": self.detail}


@dataclass(frozen=True)
class GateReport:
    checks: tuple[CheckResult, ...]
    fidelity: FidelityReport

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


def parse_metric(text: str) -> tuple[str, Measure]:
    """'logits=top1' -> ('logits', Measure.TOP1)."""
    name, equals, measure = text.rpartition("=")
    choices = ", ".join(m.value for m in Measure)
    if not equals or not name.strip():
        raise ConfigError(f"bad --metric {text!r}: expected OUTPUT=MEASURE with MEASURE one of {choices}")
    try:
        return name.strip(), Measure(measure.strip().lower())
    except ValueError:
        raise ConfigError(f"bad --metric {text!r}: unknown measure {measure!r}; choose {choices}") from None


def output_drop(output: OutputFidelity | Mapping[str, object], measure: Measure) -> float:
    """The drop of one output under `measure` (see the module docstring)."""
    values = output if isinstance(output, Mapping) else dataclasses.asdict(output)
    if measure is Measure.TOP1:
        if values["top1_agreement"] is None:
            raise ConfigError(f"--metric {values['name']}=top1: output {values['name']} has no class "
                              f"axis (top-1 needs an (N, C) or (N, T, C) output)")
        return 1.0 - float(values["top1_agreement"])
    if measure is Measure.SQNR:
        return float(10.0 ** (-float(values["sqnr_db"]) / 10.0))
    return 1.0 - float(values["cosine"])


# --- the pair of models and the feeds ----------------------------------------------------------


@dataclass(frozen=True)
class ModelPair:
    float_path: Path
    quantized_path: Path
    float_proto: onnx.ModelProto
    quantized_proto: onnx.ModelProto

    @functools.cached_property
    def scorer(self) -> Scorer:
        return Scorer()

    @functools.cached_property
    def reference(self) -> Reference:
        """The float model, opened once; its outputs cached per feed for every check."""
        return self.scorer.reference(self.float_proto)

    @functools.cached_property
    def quantized_session(self) -> object:
        return self.scorer.session(self.quantized_proto, "the quantized model")

    @classmethod
    def load(cls, float_path: Path, quantized_path: Path) -> ModelPair:
        float_proto, quantized_proto = model_io.load_model(float_path), model_io.load_model(quantized_path)
        check_same_interface(float_proto, quantized_proto)
        return cls(Path(float_path), Path(quantized_path), float_proto, quantized_proto)


def first_feeds(data: CalibrationSet, count: int) -> list[Feed]:
    return [data.feed(i) for i in range(min(count, len(data)))]


def measure(pair: ModelPair, feeds: Sequence[Feed], held_out: bool = False,
            quantized: onnx.ModelProto | None = None) -> FidelityReport:
    """Fidelity of the quantized model (or `quantized`) to the float one on `feeds`."""
    model = pair.quantized_session if quantized is None else quantized
    return pair.scorer.measure_fidelity(model, pair.reference, feeds, held_out=held_out)


# --- the checks ------------------------------------------------------------------------------


def threshold_checks(pair: ModelPair, fidelity: FidelityReport, feeds: Sequence[Feed],
                     settings: GateSettings) -> list[CheckResult]:
    """The threshold gates that were asked for, in the order of the module docstring."""
    _check_metric_names(fidelity, settings)
    checks = []
    for output in fidelity.outputs:
        if settings.min_cosine is not None:
            checks.append(CheckResult(f"min-cosine {output.name}", output.cosine >= settings.min_cosine,
                                      round(output.cosine, 6), settings.min_cosine,
                                      f"mean cosine to float on {fidelity.feeds} feeds"))
        if settings.max_drop is not None:
            measure_used = settings.measure_of(output.name)
            drop = output_drop(output, measure_used)
            checks.append(CheckResult(f"max-drop {output.name}", drop <= settings.max_drop, round(drop, 6),
                                      settings.max_drop,
                                      f"{measure_used.value} drop on {fidelity.feeds} feeds"))
    if settings.max_size_ratio is not None:
        ratio = model_file_bytes(pair.quantized_path) / model_file_bytes(pair.float_path)
        checks.append(CheckResult("max-size-ratio", ratio <= settings.max_size_ratio, round(ratio, 4),
                                  settings.max_size_ratio, "bytes on disk, external data included"))
    if settings.max_latency_ratio is not None:
        ratio, float_ms, quant_ms = latency_ratio(pair, feeds[0], settings)
        checks.append(CheckResult("max-latency-ratio", ratio <= settings.max_latency_ratio, round(ratio, 4),
                                  settings.max_latency_ratio,
                                  f"p50 {quant_ms:.3f} ms against float {float_ms:.3f} ms, "
                                  f"{settings.threads} thread(s), {settings.latency_rounds} "
                                  f"alternating rounds"))
    return checks


def _check_metric_names(fidelity: FidelityReport, settings: GateSettings) -> None:
    names = {output.name for output in fidelity.outputs}
    unknown = sorted({name for name, _ in settings.metrics} - names)
    if unknown:
        raise ConfigError(f"--metric names output(s) {', '.join(unknown)}, which the model does not have "
                          f"(outputs: {', '.join(sorted(names))})")


def latency_ratio(pair: ModelPair, feed: Feed, settings: GateSettings) -> tuple[float, float, float]:
    """(quantized p50 / float p50, float p50 ms, quantized p50 ms), timed in alternating rounds."""
    bench = BenchSettings(threads=settings.threads, warmup=3, runs=settings.latency_runs)
    float_ms, quant_ms = alternating_p50_ms([pair.float_path, pair.quantized_path], feed, bench,
                                            settings.latency_rounds)
    return quant_ms / float_ms, float_ms, quant_ms


def baseline_checks(pair: ModelPair, fidelity: FidelityReport, feeds: Sequence[Feed], card_path: Path,
                    card: Mapping[str, object], settings: GateSettings) -> list[CheckResult]:
    """Each output's drop against the baseline's: its model re-measured on the same feeds when
    the file named by its card is beside the card and matches the card's sha256, else the
    fidelity its card recorded."""
    baseline, source = _baseline_fidelity(pair, feeds, card_path, card)
    checks = []
    for output in fidelity.outputs:
        measure_used = settings.measure_of(output.name)
        old = baseline.get(output.name)
        if old is None:
            checks.append(CheckResult(f"baseline {output.name}", False, None, settings.max_regression,
                                      f"the baseline card has no output {output.name}"))
            continue
        regression = output_drop(output, measure_used) - output_drop(old, measure_used)
        checks.append(CheckResult(f"baseline {output.name}", regression <= settings.max_regression,
                                  round(regression, 6), settings.max_regression,
                                  f"{measure_used.value} drop minus the baseline's ({source})"))
    return checks


def _baseline_fidelity(pair: ModelPair, feeds: Sequence[Feed], card_path: Path,
                       card: Mapping[str, object]) -> tuple[dict[str, Mapping[str, object]], str]:
    model_entry = (card.get("provenance") or {}).get("model") or {}
    model_path = card_path.parent / str(model_entry.get("file", ""))
    if model_entry.get("file") and model_path.is_file() and \
            model_digest(model_path) == ModelDigest.from_dict(model_entry):
        report = measure(pair, feeds, quantized=model_io.load_model(model_path))
        return ({o.name: dataclasses.asdict(o) for o in report.outputs},
                f"{model_path.name} re-measured on the same feeds")
    recorded = {o["name"]: o for o in card["fidelity"]["outputs"]}
    return recorded, f"recorded in {card_path.name} on its {card['fidelity']['feeds']} held-out feeds"


def card_checks(pair: ModelPair, data: CalibrationSet, card: Mapping[str, object],
                settings: GateSettings) -> tuple[list[CheckResult], FidelityReport | None]:
    """The files are the ones the card names, and its recorded fidelity holds on the held-out
    feeds it was measured on (the card's seed, holdout and max_feeds pick them again). A card of
    a run without data recorded no fidelity: only the files are checked."""
    provenance = card.get("provenance") or {}
    if "model" not in provenance:
        raise ConfigError("the card records no model digest (written by an onnxq before card version 2); "
                          "quantize again to get one")
    checks = [_digest_check("card: model file", pair.quantized_path, provenance["model"]),
              _digest_check("card: float model", pair.float_path, provenance["float_model"])]
    if not card["fidelity"]["feeds"]:  # a run without data (dynamic activations): nothing recorded
        return checks, None
    recorded_data = provenance["calibration"]["sha256"]
    actual_data = feeds_sha256(data)
    checks.append(CheckResult("card: calibration data", actual_data == recorded_data, actual_data[:16],
                              recorded_data[:16], f"content sha256 of {data.origin}"))
    feeds = held_out_feeds(data, card["config"])
    fidelity = measure(pair, feeds, held_out=True)
    recorded = {o["name"]: o for o in card["fidelity"]["outputs"]}
    for output in fidelity.outputs:
        old = recorded.get(output.name)
        difference = None if old is None else abs(output.cosine - float(old["cosine"]))
        checks.append(CheckResult(f"card: fidelity {output.name}",
                                  difference is not None and difference <= settings.max_regression,
                                  None if difference is None else round(difference, 6),
                                  settings.max_regression,
                                  f"|cosine - recorded| on {len(feeds)} held-out feeds"))
    return checks, fidelity


def _digest_check(name: str, path: Path, recorded: Mapping[str, object]) -> CheckResult:
    actual = model_digest(path)
    expected = ModelDigest.from_dict(recorded)
    return CheckResult(name, actual == expected, actual.sha256[:16], expected.sha256[:16],
                       f"sha256 of {path.name} and its external data")


def held_out_feeds(data: CalibrationSet, config: Mapping[str, object]) -> list[Feed]:
    """The feeds a quantize run with `config` measured its fidelity on (onnxq.stages.prepare)."""
    max_feeds = config.get("max_feeds")
    if max_feeds is not None and len(data) > int(max_feeds):
        data = data.subset(range(int(max_feeds)))
    rng = np.random.default_rng(int(config.get("seed", 0)))
    calibration, held_out = data.split(int(config.get("holdout", 4)), rng)
    return list(held_out if len(held_out) else calibration)


def open_data(pair: ModelPair, data: object) -> CalibrationSet:
    return open_calibration(data, pair.float_proto)


# --- reports -----------------------------------------------------------------------------------


def junit_xml(report: GateReport, suite: str = "onnxq check") -> str:
    """The checks as a JUnit XML document: one test case per check, a <failure> for each
    failed one."""
    failures = sum(not check.passed for check in report.checks)
    root = ElementTree.Element("testsuites", name=suite, tests=str(len(report.checks)),
                               failures=str(failures))
    suite_element = ElementTree.SubElement(root, "testsuite", name=suite, tests=str(len(report.checks)),
                                           failures=str(failures), errors="0", skipped="0",
                                           timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    for check in report.checks:
        case = ElementTree.SubElement(suite_element, "testcase", classname="onnxq.check", name=check.name)
        text = f"value {check.value}, limit {check.limit}" + (f"; {check.detail}" if check.detail else "")
        if check.passed:
            ElementTree.SubElement(case, "system-out").text = text
        else:
            ElementTree.SubElement(case, "failure", message=text, type="GateFailed").text = text
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
