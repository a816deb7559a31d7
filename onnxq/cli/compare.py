"""`onnxq compare`: how far a quantized model is from its float model, and which layers did it.

    onnxq compare FLOAT QUANTIZED --data PATH [--max-feeds N] [--per-layer] [--top N] [--json]

Prints per-output fidelity (cosine, min cosine, SQNR, max |err|, top-1 agreement); with
--per-layer, the layers ranked by the damage their quantization does alone and a ready-made
`--exclude` value for `onnxq quantize`; layers with dynamic activations (quantized per batch at
run time) are listed apart, not ranked. Exit codes: 0 done; 2 bad input (one line on stderr);
1 an internal error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shlex
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxq.cli.support import OneLineCommand, reports_errors
from onnxq.report.compare import (
    DEFAULT_MAX_FEEDS,
    DynamicLayer,
    LayerDamage,
    WeightSource,
    compare_models,
    dynamic_layers,
    exclude_suggestion,
    rank_layers,
)
from onnxq.scoring.fidelity import FidelityReport

logger = logging.getLogger(__name__)


@click.command("compare", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("float_path", metavar="FLOAT", type=click.Path(path_type=Path))
@click.argument("quantized_path", metavar="QUANTIZED", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Feeds: a .npz (one array per model input, samples on axis 0) or a folder of "
                   ".npz files, one feed each.")
@click.option("--max-feeds", type=click.IntRange(min=1), default=DEFAULT_MAX_FEEDS, show_default=True,
              help="Use at most this many feeds (the first ones).")
@click.option("--per-layer", is_flag=True,
              help="Rank the layers by the damage their quantization does alone (two ONNX Runtime "
                   "sessions per layer).")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="With --per-layer: how many of the worst layers to show and suggest excluding.")
@click.option("--layers", multiple=True,
              help="With --per-layer: only these layers (node names, op types or globs; repeatable "
                   "or comma-separated).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON on stdout.")
@reports_errors
def compare(float_path: Path, quantized_path: Path, data: Path, max_feeds: int, per_layer: bool,
            top: int, layers: tuple[str, ...], as_json: bool) -> None:
    """Compare the QUANTIZED model with the FLOAT model it came from, on the feeds of --data.

    Both models must take the same inputs. With --per-layer, each layer (a node reading a
    DequantizeLinear) is measured twice: with only its inputs quantized (damage) and with only
    its inputs restored to float in the quantized model (recovery).
    """
    report = compare_models(float_path, quantized_path, data, max_feeds)
    ranked = None
    if per_layer:
        selection = tuple(item.strip() for value in layers for item in value.split(",") if item.strip())
        ranked = _rank_with_progress(float_path, quantized_path, data, max_feeds, selection or None,
                                     show=not as_json)
    suggestion = exclude_suggestion(ranked, top) if ranked is not None else None
    dynamic = dynamic_layers(quantized_path) if per_layer else []
    if as_json:
        result = _as_json(float_path, quantized_path, report, ranked, top, suggestion)
        if per_layer:
            result["dynamic_layers"] = [dataclasses.asdict(layer) for layer in dynamic]
        click.echo(json.dumps(result, indent=2))
        return
    console = Console()
    console.print(_fidelity_table(report))
    if ranked is not None:
        console.print(_layer_table(ranked[:top], len(ranked)))
        if any(layer.weights is WeightSource.DEQUANTIZED for layer in ranked[:top]):
            console.print("* no float constant matches its quantized weights (e.g. they were rescaled "
                          "by SmoothQuant): they stay dequantized in both measurements")
        if dynamic:
            console.print(_dynamic_line(dynamic))
        # Plain echo: rich would wrap a long line that is meant to be pasted.
        click.echo(f"suggestion: --exclude {shlex.quote(suggestion)}" if suggestion
                   else "suggestion: none (no layer loses fidelity on its own)")


def _rank_with_progress(float_path: Path, quantized_path: Path, data: Path, max_feeds: int,
                        layers: tuple[str, ...] | None, show: bool) -> list[LayerDamage]:
    console = Console(stderr=True)
    if not show or not console.is_terminal:
        return rank_layers(float_path, quantized_path, data, max_feeds, layers)
    with Progress(TextColumn("layers"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("layers", total=None)
        return rank_layers(float_path, quantized_path, data, max_feeds, layers,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))


def _dynamic_line(dynamic: list[DynamicLayer]) -> str:
    shown = ", ".join(layer.node for layer in dynamic[:8]) + (", ..." if len(dynamic) > 8 else "")
    return (f"{len(dynamic)} layers with dynamic activations (quantized per batch at run time; not "
            f"ranked, no Q/DQ to bypass): {shown}")


def _fidelity_table(report: FidelityReport) -> Table:
    table = Table(title=f"quantized vs float on {report.feeds} feeds")
    table.add_column("output", justify="left")
    for column in ("cosine", "min cosine", "SQNR dB", "max |err|", "top-1 agree"):
        table.add_column(column, justify="right")
    for output in report.outputs:
        top1 = output.top1_agreement
        table.add_row(output.name, f"{output.cosine:.5f}", f"{output.min_cosine:.5f}",
                      f"{output.sqnr_db:.1f}", f"{output.max_abs_error:.4g}",
                      "-" if top1 is None else f"{top1:.4f}")
    return table


def _layer_table(worst: list[LayerDamage], total: int) -> Table:
    table = Table(title=f"worst {len(worst)} of {total} layers",
                  caption="damage: fidelity lost with only the layer's inputs quantized; recovery: "
                          "fidelity regained by restoring only them; to exclude: the nodes to keep "
                          "float so that they stay float")
    table.add_column("#", justify="right")
    table.add_column("node", justify="left", overflow="fold")
    table.add_column("op", justify="left", no_wrap=True)
    table.add_column("damage", justify="right", no_wrap=True)
    table.add_column("recovery", justify="right", no_wrap=True)
    table.add_column("to exclude", justify="left", overflow="fold")
    for rank, layer in enumerate(worst, 1):
        weights = "" if layer.weights is not WeightSource.DEQUANTIZED else " *"
        table.add_row(str(rank), layer.node + weights, layer.op_type, f"{layer.damage:.3g}",
                      f"{layer.recovery:.3g}", ", ".join(layer.exclude) or "-")
    return table


def _finite(value: object) -> object:
    """JSON has no infinity or NaN: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _report_dict(report: FidelityReport) -> dict:
    return {"feeds": report.feeds, "outputs": [dataclasses.asdict(o) for o in report.outputs]}


def _layer_dict(layer: LayerDamage) -> dict:
    return {"node": layer.node, "op_type": layer.op_type, "damage": layer.damage,
            "recovery": layer.recovery, "quantized_inputs": list(layer.quantized_inputs),
            "weights": layer.weights.value, "exclude": list(layer.exclude),
            "only_quantized": _report_dict(layer.only_quantized),
            "restored": _report_dict(layer.restored)}


def _as_json(float_path: Path, quantized_path: Path, report: FidelityReport,
             ranked: list[LayerDamage] | None, top: int, suggestion: str | None) -> dict:
    result: dict = {"float": str(float_path), "quantized": str(quantized_path),
                    "fidelity": _report_dict(report)}
    if ranked is not None:
        result |= {"layers": [_layer_dict(layer) for layer in ranked], "top": top,
                   "suggestion": suggestion}
    return _finite(result)
