"""`onnxq check`: a quality gate for a quantized model, for release pipelines.

    onnxq check FLOAT QUANTIZED --data D [--min-cosine X] [--max-drop D] [--max-size-ratio S]
                [--max-latency-ratio R] [--baseline OLD.card.json] [--max-regression E]
                [--metric OUTPUT=cosine|top1|sqnr ...] [--json] [--junit FILE]
    onnxq check --card OUT.card.json QUANTIZED [FLOAT-less: the card names it] [--data D]

Prints a table of every check with pass/fail (onnxq.report.gate says what each measures).
Exit codes: 0 every check passed; 3 a gate failed (the table, --json and --junit say which);
2 bad input (one line on stderr: a missing or broken model, data that does not fit, a bad
value); 1 an internal error.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from onnxq import model_io
from onnxq.cli.support import OneLineCommand, reports_errors
from onnxq.errors import ConfigError, OnnxqError
from onnxq.report import gate
from onnxq.report.gate import GateReport, GateSettings, ModelPair

GATE_FAILED = 3


@click.command("check", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", metavar="[FLOAT] QUANTIZED", nargs=-1, required=True,
                type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Feeds: a .npz (samples on axis 0) or a folder of .npz files. With --card, "
                   "defaults to the calibration data the card names.")
@click.option("--max-feeds", type=click.IntRange(min=1), default=gate.DEFAULT_MAX_FEEDS, show_default=True,
              help="Measure on at most this many feeds (the first ones).")
@click.option("--min-cosine", type=float, default=None, help="Every output's mean cosine to float >= X.")
@click.option("--max-drop", type=float, default=None,
              help="Every output's drop <= D: 1 - cosine, or per --metric (1 - top-1 agreement, "
                   "noise-to-signal ratio).")
@click.option("--max-size-ratio", type=float, default=None,
              help="Bytes on disk (external data included), quantized / float <= S.")
@click.option("--max-latency-ratio", type=float, default=None,
              help="p50 latency in ONNX Runtime, quantized / float <= R (alternating rounds).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Intra-op threads for --max-latency-ratio.")
@click.option("--baseline", type=click.Path(path_type=Path), default=None, metavar="OLD.card.json",
              help="The last release's card: no output's drop may exceed the baseline model's by "
                   "more than --max-regression (its model is re-measured on the same feeds when "
                   "found beside the card with the recorded sha256, else its recorded fidelity).")
@click.option("--max-regression", type=float, default=gate.DEFAULT_MAX_REGRESSION, show_default=True,
              help="Allowed regression against --baseline, and allowed difference from the "
                   "fidelity a --card recorded.")
@click.option("--card", "card_path", type=click.Path(path_type=Path), default=None, metavar="OUT.card.json",
              help="Check that QUANTIZED (and the float model and data) are the files this card "
                   "describes (sha256) and that its recorded fidelity holds.")
@click.option("--metric", "metrics", multiple=True, metavar="OUTPUT=MEASURE",
              help="How an output's drop is measured: cosine (default), top1 or sqnr. Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON on stdout.")
@click.option("--junit", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Also write the checks as JUnit XML (one test case per check).")
@reports_errors
def check(models: tuple[Path, ...], data: Path | None, max_feeds: int, min_cosine: float | None,
          max_drop: float | None, max_size_ratio: float | None, max_latency_ratio: float | None,
          threads: int, baseline: Path | None, max_regression: float, card_path: Path | None,
          metrics: tuple[str, ...], as_json: bool, junit: Path | None) -> None:
    """Check the QUANTIZED model against its FLOAT model and the thresholds given.

    \b
    Examples:
      onnxq check float.onnx int8.onnx --data calib/ --max-drop 0.01 --junit report.xml
      onnxq check float.onnx int8.onnx --data calib/ --baseline last/int8.card.json
      onnxq check --card int8.card.json int8.onnx --max-size-ratio 0.3

    Exit codes: 0 all passed; 3 a gate failed; 2 bad input (one line on stderr); 1 internal error.
    """
    settings = GateSettings(min_cosine=min_cosine, max_drop=max_drop, max_size_ratio=max_size_ratio,
                            max_latency_ratio=max_latency_ratio, max_regression=max_regression,
                            metrics=tuple(gate.parse_metric(text) for text in metrics), max_feeds=max_feeds,
                            threads=threads)
    card = _read_card(card_path) if card_path is not None else None
    baseline_card = _read_card(baseline) if baseline is not None else None
    pair = ModelPair.load(*_model_paths(models, card_path, card))
    if junit is not None:
        model_io.check_output_path(None, junit)
    report = run_checks(pair, data, settings, card_path, card, baseline, baseline_card)
    if junit is not None:
        model_io.write_text_atomic(junit, gate.junit_xml(report))
    if as_json:
        click.echo(json.dumps({"passed": report.passed, "float": str(pair.float_path),
                               "quantized": str(pair.quantized_path),
                               "checks": [c.to_dict() for c in report.checks]}, indent=2))
    else:
        _print_table(report, pair)
    if not report.passed:
        raise SystemExit(GATE_FAILED)


def run_checks(pair: ModelPair, data: Path | None, settings: GateSettings, card_path: Path | None,
               card: dict | None, baseline: Path | None, baseline_card: dict | None) -> GateReport:
    """Every check asked for; with a card, its own checks first."""
    source = data if data is not None else _card_data(card, card_path)
    feeds_set = gate.open_data(pair, source)
    checks = []
    if card is not None:
        card_results, _ = gate.card_checks(pair, feeds_set, card, settings)
        checks += card_results
    feeds = gate.first_feeds(feeds_set, settings.max_feeds)
    fidelity = gate.measure(pair, feeds)
    checks += gate.threshold_checks(pair, fidelity, feeds, settings)
    if baseline_card is not None:
        checks += gate.baseline_checks(pair, fidelity, feeds, baseline, baseline_card, settings)
    if not checks:
        raise ConfigError("nothing to check: give a threshold (--min-cosine, --max-drop, --max-size-ratio, "
                          "--max-latency-ratio), --baseline or --card")
    return GateReport(tuple(checks), fidelity)


def _read_card(path: Path) -> dict:
    try:
        card = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OnnxqError(f"card not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OnnxqError(f"{path} is not a readable card ({error})") from None
    if not isinstance(card, dict) or "fidelity" not in card or "config" not in card:
        raise OnnxqError(f"{path} is not an onnxq card (no fidelity or config; cards from onnxq before "
                         f"card version 2 cannot be checked)")
    return card


def _model_paths(models: tuple[Path, ...], card_path: Path | None, card: dict | None) -> tuple[Path, Path]:
    """(float, quantized): both given, or with --card the quantized one given and the float one
    the card's source (as recorded, else beside the card)."""
    if len(models) == 2:
        return models[0], models[1]
    if len(models) != 1 or card is None:
        raise ConfigError("give FLOAT and QUANTIZED (or --card CARD and QUANTIZED)")
    source = card.get("source")
    if not source:
        raise ConfigError(f"{card_path} names no float model (it was quantized from memory); give FLOAT")
    for candidate in (Path(source), card_path.parent / Path(source).name):
        if candidate.is_file():
            return candidate, models[0]
    raise ConfigError(f"the float model {source} that {card_path} names is not found; give FLOAT")


def _card_data(card: dict | None, card_path: Path | None) -> Path:
    if card is None:
        raise ConfigError("--data is required (feeds to measure the models on), except with --card")
    origin = ((card.get("provenance") or {}).get("calibration") or {}).get("origin")
    if not card["fidelity"]["feeds"]:
        raise ConfigError(f"{card_path} records no data (quantized without calibration data); give --data")
    if not origin or not Path(origin).exists():
        raise ConfigError(f"the calibration data {origin} that {card_path} names is not found; give --data")
    return Path(origin)


def _print_table(report: GateReport, pair: ModelPair) -> None:
    console = Console()
    table = Table(title=f"onnxq check {pair.quantized_path} against {pair.float_path}")
    for column in ("check", "value", "limit", "result", "detail"):
        table.add_column(column, justify="left" if column in ("check", "detail") else "right")
    for item in report.checks:
        table.add_row(item.name, str(item.value), str(item.limit),
                      "[green]pass[/]" if item.passed else "[red]FAIL[/]", item.detail)
    console.print(table)
    failed = [item.name for item in report.checks if not item.passed]
    console.print(f"{len(report.checks) - len(failed)} of {len(report.checks)} checks passed"
                  + (f"; failed: {', '.join(failed)}" if failed else ""))
