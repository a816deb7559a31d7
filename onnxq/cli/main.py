"""The `onnxq` command line.

    onnxq quantize IN OUT --calib PATH [options]
    onnxq quantize IN OUT --activations dynamic      (no data needed; fidelity then unmeasured)

Exit codes: 0 the quantized model was verified and written; 2 bad input (model, data, config,
paths) with one line on stderr and nothing written; 3 the quantized model failed verification
(nothing written); 1 an internal error. Settings: command-line flags override the `--config`
TOML file, which overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxq import model_io
from onnxq.api import QuantResult, quantize
from onnxq.cli.bench import bench
from onnxq.cli.check import check
from onnxq.cli.compare import compare
from onnxq.cli.support import OneLineCommand, OneLineGroup, reports_errors
from onnxq.config import (
    DEFAULT_GROUP_SIZE,
    ActivationMode,
    ActivationType,
    CalibrationMethod,
    DamageMeasure,
    ModeRule,
    PerTensor,
    QuantConfig,
    ScaleSearch,
    SearchedScales,
    SearchGraph,
    WeightMethod,
    load_config,
    parse_group_size,
)
from onnxq.errors import ConfigError
from onnxq.report.card import card_paths

logger = logging.getLogger(__name__)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxq")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does (to stderr).")
def main(verbose: bool) -> None:
    """onnxq: post-training quantization of ONNX models for ONNX Runtime."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _split_list(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(item.strip() for value in values for item in value.split(",") if item.strip())


def _bits_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(item) for item in _split_list((text,)))
    except ValueError:
        raise ConfigError(f"--candidate-bits {text!r} is not a list of integers") from None


def _size_budget(text: str | None) -> dict[str, float]:
    """--max-size: "12.5" (MB) or "0.15x" (fraction of the float file)."""
    if text is None:
        return {}
    key = "max_size_ratio" if text.strip().lower().endswith("x") else "max_size_mb"
    try:
        return {key: float(text.strip().rstrip("xX"))}
    except ValueError:
        raise ConfigError(f"--max-size {text!r} is not a number of MB or a ratio like 0.15x") from None


def _build_config(config_file: Path | None, **flags: object) -> QuantConfig:
    config = load_config(config_file) if config_file is not None else QuantConfig()
    changes = {key: value for key, value in flags.items() if value is not None and value != ()}
    return config.replace(**changes)


@main.command("quantize", cls=OneLineCommand)
@click.argument("input_path", metavar="IN", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--calib", "calib", type=click.Path(path_type=Path), default=None,
              help="Calibration data: a .npz (one array per model input, samples on axis 0) or a "
                   "folder of .npz files, one feed each. Needed except with --activations dynamic "
                   "(there it is used for SmoothQuant, bias correction and measuring fidelity).")
@click.option("--activations", type=click.Choice([m.value for m in ActivationMode]), default=None,
              help="Activations of MatMul / Gemm layers: static (scales from calibration), dynamic "
                   "(per batch at run time; other layers static with --calib, float without) or "
                   "auto (static, dynamic or float per layer, by measured damage and latency) "
                   "[default: static].")
@click.option("--method", type=click.Choice([m.value for m in CalibrationMethod] + ["comq"]),
              default=None,
              help="How activation ranges are chosen from calibration statistics [default: mse]; "
                   "'comq' searches weight codes and scales with COMQ (activations: mse).")
@click.option("--weight-bits", type=click.Choice(["2", "3", "4", "8"]), default=None,
              help="Bits of every quantized weight; 3-4 stored as int4 (opset 21), 2 as int2 "
                   "(opset 25) or 2-bit MatMulNBits [default: 8].")
@click.option("--short-row-bits", type=click.Choice(["0", "2", "3", "4", "8"]), default=None,
              help="Weights below these bits whose rows are no longer than one group (depthwise "
                   "Convs) get these bits instead; 0: none [default: 8].")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="8-bit weights as 7-bit codes, so that x86 integer kernels without VNNI cannot "
                   "saturate [default: on when this CPU lacks VNNI/AMX].")
@click.option("--layer", "layer_rules", multiple=True, metavar="PATTERN=BITS|MODE",
              help="Weight bits of the layers matching PATTERN (node name, op type or glob): 2, 3, "
                   "4, 8 or float; or their activations: static or dynamic. Repeatable; the last "
                   "matching rule wins; rules come after --exclude and before the allocator (bits) "
                   "or --activations (modes); one that matches nothing is an error.")
@click.option("--avg-bits", type=float, default=None,
              help="Allocate weight bits per layer by measured sensitivity: mean bits (weighted "
                   "by element count) at most this.")
@click.option("--max-size", "max_size", default=None, metavar="MB|Rx",
              help="Allocate weight bits per layer so the written file is at most this many MB, "
                   "or this fraction of the float file with an x (0.15x).")
@click.option("--max-bops", type=float, default=None,
              help="Allocate weight bits per layer within this many GBOPs (MACs x weight bits "
                   "x activation bits, on the first calibration feed).")
@click.option("--max-drop", type=float, default=None,
              help="Smallest allocation whose held-out fidelity drop (1 - worst output cosine) "
                   "stays within this.")
@click.option("--max-latency", type=float, default=None, metavar="R",
              help="Allocate weight bits per layer (and, with --activations auto, modes) so the "
                   "written model runs within R times the float model's latency (ORT p50 on this "
                   "machine); alone or with one of the budgets above.")
@click.option("--candidate-bits", default=None, metavar="LIST",
              help="Bits the allocator chooses from, e.g. 4,8 [default: 2,3,4,8].")
@click.option("--sensitivity", type=click.Choice(["mse", "kl", "infonce"]), default=None,
              help="Damage measure of the allocator's per-layer probes [default: mse].")
@click.option("--conv-storage", type=click.Choice(["compact", "fast"]), default=None,
              help="Conv weights below 8 bits: compact (int4, group-wise: smallest, run as float "
                   "Convs by ORT) or fast (int8 container, per channel: QLinearConv) "
                   "[default: compact].")
@click.option("--no-matmul-nbits", is_flag=True, default=None,
              help="Write 2-4-bit MatMul weights as DequantizeLinear -> MatMul rather than "
                   "com.microsoft MatMulNBits (ORT's 4-bit / 2-bit kernel, the default).")
@click.option("--no-gather", is_flag=True, default=None,
              help="Keep embedding tables read by Gather float.")
@click.option("--percentile", type=float, default=None,
              help="Percentile kept by --method percentile [default: 99.999].")
@click.option("--per-tensor", is_flag=True, default=None,
              help="One scale per weight tensor instead of one per output channel.")
@click.option("--group-size", default=None, metavar="N",
              help="Weights below 8 bits get one scale per N consecutive weights along the "
                   "reduction axis (N >= 2; 0: one per output channel) "
                   f"[default: {DEFAULT_GROUP_SIZE}]. 8-bit weights stay per channel "
                   "(weight_granularity = \"per_group(N)\" in a config file groups them too).")
@click.option("--act-type", type=click.Choice([t.value for t in ActivationType]), default=None,
              help="Activation type: uint8 asymmetric or int8 symmetric [default: uint8].")
@click.option("--exclude", multiple=True,
              help="Keep nodes float: a node name, an op type (e.g. Softmax) or a glob over node "
                   "names ('*attention*'). Repeatable or comma-separated; one that matches "
                   "nothing is an error.")
@click.option("--no-activation-matmul", is_flag=True, default=None,
              help="Leave MatMuls of two activations (attention) float.")
@click.option("--no-smooth", is_flag=True, default=None,
              help="Skip SmoothQuant on MatMul inputs (on by default; alpha via the config file).")
@click.option("--no-equalize", is_flag=True, default=None,
              help="Skip channel equalization of Conv activations (on by default; exact in float).")
@click.option("--no-bias-correction", is_flag=True, default=None,
              help="Skip bias correction of Conv/Gemm (on by default).")
@click.option("--no-comq-sequential", is_flag=True, default=None,
              help="With COMQ weights: skip the second search, layer by layer on the quantized "
                   "model's inputs toward the float outputs (on by default; most of COMQ's time).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="TOML file with the same settings (flags given here override it).")
@click.option("--holdout", type=click.IntRange(min=0), default=None,
              help="Calibration feeds held out to measure fidelity [default: 4].")
@click.option("--max-feeds", type=click.IntRange(min=1), default=None,
              help="Use at most this many calibration feeds.")
@click.option("--min-cosine", type=float, default=None,
              help="Fail (exit 3, nothing written) if an output's cosine to float on held-out "
                   "feeds is below this.")
@click.option("--seed", type=int, default=None, help="Seed of every random choice [default: 0].")
@click.option("--search", type=click.Choice([s.value for s in ScaleSearch]), default=None,
              help="Search activation scales after calibration: evolq (evolutionary, scored "
                   "through ONNX Runtime block by block) [default: none].")
@click.option("--search-budget", type=click.IntRange(min=1), default=None,
              help="Candidate evaluations of one scale search; --search-scales auto runs two "
                   "[default: 240].")
@click.option("--search-loss", type=click.Choice([m.value for m in DamageMeasure]), default=None,
              help="Loss of the scale search on the model outputs [default: mse].")
@click.option("--search-scales", type=click.Choice([s.value for s in SearchedScales]), default=None,
              help="What the scale search moves: activation scales, one multiplier per weight "
                   "(codes kept), both (per block, one kind then the other), or auto (each kind "
                   "searched apart; the held-out calibration feeds choose) [default: auto].")
@click.option("--search-graph", type=click.Choice([g.value for g in SearchGraph]), default=None,
              help="What a search candidate is scored on: fused (the model written with its "
                   "scales, run as ONNX Runtime fuses it into integer kernels; a session per "
                   "candidate) or lifted (one session with the scales as inputs, unfused) "
                   "[default: fused].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes that score search candidates [default: 1, this process].")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None,
              help="Where the workers run: local processes, or Ray ($RAY_ADDRESS or a local "
                   "instance; needs onnxq[ray]) [default: local].")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default=None,
              help="ONNX Runtime execution provider for calibration and scoring [default: cpu].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="No progress display and no summary.")
@reports_errors
def quantize_command(input_path: Path, output_path: Path, calib: Path | None, activations: str | None,
                     method: str | None,
                     weight_bits: str | None, short_row_bits: str | None, reduce_range: bool | None,
                     layer_rules: tuple[str, ...],
                     avg_bits: float | None,
                     max_size: str | None, max_bops: float | None, max_drop: float | None,
                     max_latency: float | None, candidate_bits: str | None, sensitivity: str | None,
                     conv_storage: str | None, no_matmul_nbits: bool | None,
                     no_gather: bool | None, percentile: float | None, per_tensor: bool | None,
                     group_size: str | None, act_type: str | None,
                     exclude: tuple[str, ...], no_activation_matmul: bool | None,
                     no_smooth: bool | None, no_equalize: bool | None, no_bias_correction: bool | None,
                     no_comq_sequential: bool | None,
                     config_file: Path | None, holdout: int | None, max_feeds: int | None,
                     min_cosine: float | None, seed: int | None, search: str | None,
                     search_budget: int | None, search_loss: str | None, search_scales: str | None,
                     search_graph: str | None, workers: int | None,
                     executor: str | None, provider: str | None, as_json: bool, quiet: bool) -> None:
    """Quantize the float ONNX model IN to an int8 QDQ model written to OUT.

    Weights of Conv, ConvTranspose, Gemm and MatMul become int8 (per channel, symmetric);
    activations feeding them become uint8 (or int8) per tensor, with ranges calibrated by running
    ONNX Runtime on --calib. With --activations dynamic, MatMul / Gemm layers quantize their
    input per batch at run time instead, and no --calib is needed (the other layers then stay
    float, and the fidelity is not measured). OUT is written only after the quantized model
    passed the ONNX checker, loaded in ONNX Runtime and was compared with the float model on
    held-out feeds.
    """
    model_io.check_output_path(input_path, output_path)
    layer_bits = tuple(rule for rule in layer_rules if not ModeRule.is_mode_rule(rule))
    layer_activations = tuple(rule for rule in layer_rules if ModeRule.is_mode_rule(rule))
    config = _build_config(
        config_file,
        method=CalibrationMethod(method) if method and method != "comq" else None,
        weight_method=WeightMethod.COMQ if method == "comq" else None,
        weight_bits=int(weight_bits) if weight_bits else None,
        short_row_bits=None if short_row_bits is None else int(short_row_bits), reduce_range=reduce_range,
        activations=ActivationMode(activations) if activations else None,
        layer_activations=layer_activations, layer_bits=layer_bits, avg_bits=avg_bits,
        **_size_budget(max_size), max_bops=max_bops,
        max_drop=max_drop, max_latency=max_latency, candidate_bits=_bits_list(candidate_bits),
        sensitivity=sensitivity, conv_storage=conv_storage,
        matmul_nbits=False if no_matmul_nbits else None, quantize_gather=False if no_gather else None,
        percentile=percentile,
        weight_granularity=PerTensor() if per_tensor else None,
        weight_group_size=None if group_size is None else parse_group_size(group_size),
        activation_type=ActivationType(act_type) if act_type else None,
        exclude=_split_list(exclude),
        quantize_activation_matmul=False if no_activation_matmul else None,
        smooth=False if no_smooth else None,
        equalize=False if no_equalize else None,
        bias_correction=False if no_bias_correction else None,
        comq_sequential=False if no_comq_sequential else None,
        holdout=holdout, max_feeds=max_feeds, min_cosine=min_cosine, seed=seed, search=search,
        workers=workers, executor=executor, provider=provider)
    evolq = {key: value for key, value in (("budget", search_budget), ("loss", search_loss),
                                           ("scales", search_scales), ("graph", search_graph))
             if value is not None}
    if evolq:
        config = config.replace(evolq=dataclasses.replace(config.evolq, **evolq))
    result = _run_with_progress(input_path, calib, config, show=not quiet and not as_json)
    result.save(output_path)
    summary = result.summary() | {"input": str(input_path), "output": str(output_path)}
    summary["card"] = [str(p) for p in card_paths(output_path)]
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        _print_summary(summary)


def _run_with_progress(model: Path, calib: Path | None, config: QuantConfig, show: bool) -> QuantResult:
    console = Console(stderr=True)
    if not show or not console.is_terminal:
        return quantize(model, calib, config)
    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        def progress(stage: str, advance: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.advance(tasks[stage], advance)
        return quantize(model, calib, config, progress=progress)


def _print_summary(summary: dict) -> None:
    console = Console()
    console.print(f"[bold]onnxq[/] {summary['input']} -> {summary['output']}")
    quantized = ", ".join(f"{op} x{n}" for op, n in summary["quantized_ops"].items()) or "none"
    left = ", ".join(f"{op} x{n}" for op, n in summary["float_ops"].items()) or "none"
    console.print(f"  quantized: {quantized}")
    console.print(f"  left float: {left}")
    bits = ", ".join(f"{b}-bit x{n}" for b, n in summary["weight_bits"].items()) or "none"
    console.print(f"  weights: {bits}")
    activations = summary["activations"]
    modes = ", ".join(f"{mode} x{n}" for mode, n in activations["layers"].items()) or "none"
    console.print(f"  activations ({activations['mode']}): {modes}")
    if "auto" in activations:
        auto = activations["auto"]
        latency = auto["latency_ratio"][auto["chosen"]]
        console.print(f"  auto: {auto['chosen']} model ({latency:.2f}x float latency), {auto['why']}")
    if summary["allocation"]:
        allocation = summary["allocation"]
        console.print(f"  allocation under {allocation['budget']}: used {allocation['used']:.6g} "
                      f"of {allocation['limit']:.6g}; mean weight bits {allocation['average_bits']:.2f}")
        if check := allocation["uniform_check"]:
            uniform = f"all {check['bits']}-bit"
            written = uniform if check["uniform_chosen"] else "knapsack's mix"
            console.print(f"  whole models: knapsack {check['knapsack_damage']:.4g} vs {uniform} "
                          f"{check['uniform_damage']:.4g} damage on calibration feeds: {written} written")
        for predicted, measured in allocation["latency_steps"]:
            console.print(f"  max_latency: predicted {predicted:.2f}x float, measured {measured:.2f}x")
    if summary["search"]:
        search = summary["search"]
        console.print(f"  scale search (evolq, {search['scales']} scales, {search['loss']} loss, "
                      f"{search['scope']}, {search['graph']} graph): "
                      f"{search['evaluations']} evaluations, {search['blocks_kept']} of "
                      f"{search['blocks']} blocks changed")
        if search["acceptance"]:
            console.print(f"  scale search {search['acceptance']['reason']}")
    console.print(f"  size: {summary['float_bytes'] / 1e6:.2f} MB -> "
                  f"{summary['quantized_bytes'] / 1e6:.2f} MB ({summary['size_ratio']:.3f}x)")
    _print_latency(console, summary["latency"])
    fidelity = summary["fidelity"]
    if not fidelity["measured"]:
        console.print("  fidelity: not measured (no data; give --calib to measure it on held-out feeds)")
    else:
        console.print(_fidelity_table(fidelity))
    seconds = summary["seconds"]
    console.print("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    console.print("  card: " + ", ".join(summary["card"]))


def _print_latency(console: Console, latency: dict | None) -> None:
    if latency is None:
        console.print("  latency: not measured (no data, or measure_latency = false)")
        return
    console.print(f"  latency: {latency['ratio']:.2f}x float (p50 {latency['quantized_ms']:.2f} ms vs "
                  f"{latency['float_ms']:.2f} ms, {latency['threads']} thread(s), this machine)")
    if latency["slower_than_float"]:
        console.print(f"  [bold yellow]slower than float[/]: {latency['why']}")


def _fidelity_table(fidelity: dict) -> Table:
    table = Table(title=f"fidelity to float on {fidelity['feeds']} "
                        f"{'held-out' if fidelity['held_out'] else 'calibration'} feeds")
    for column in ("output", "cosine", "min cosine", "SQNR dB", "max |err|", "top-1 agree"):
        table.add_column(column, justify="right")
    for output in fidelity["outputs"]:
        top1 = output["top1_agreement"]
        table.add_row(output["name"], f"{output['cosine']:.5f}", f"{output['min_cosine']:.5f}",
                      f"{output['sqnr_db']:.1f}", f"{output['max_abs_error']:.4g}",
                      "-" if top1 is None else f"{top1:.3f}")
    return table


main.add_command(bench)
main.add_command(check)
main.add_command(compare)
