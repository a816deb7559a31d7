"""The quantization card: what was done to every layer, written beside each output model.

`OUT.card.json` (for tools) and `OUT.card.md` (for people) hold, per quantized layer, its
weight bits, granularity, symmetry, method, measured sensitivity (when bits were allocated),
activation mode (static, dynamic, or none for a weight-only layer) and why, and bytes on disk;
what stayed float and why; the calibration data and method; the budget and how much of it was
used; the fidelity measured against float on held-out feeds; the full config; and the provenance
of the model (onnxq.report.provenance): digests of the float model,
the calibration data and the written model, and the library versions. The same inputs, config,
seed and versions give the same card byte for byte: timings stay in the run's summary.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Protocol

from onnxq import model_io
from onnxq.bits.allocation import AllocationReport
from onnxq.config import QuantConfig, config_to_dict
from onnxq.plan import QuantPlan, WeightQuant
from onnxq.qparams import QParams
from onnxq.report.provenance import ModelDigest, Provenance
from onnxq.scoring.fidelity import FidelityReport


class QuantResult(Protocol):
    """What a card is made from (onnxq.result.QuantResult)."""

    plan: QuantPlan
    qparams: QParams
    config: QuantConfig
    fidelity: FidelityReport
    calibration_feeds: int
    float_bytes: int
    quantized_bytes: int
    searched_layers: frozenset[str]
    source: str | None
    allocation: AllocationReport | None
    search: object | None  # onnxq.stages.evolq.SearchReport
    modes: object | None  # onnxq.stages.activation_modes.ModeReport
    provenance: Provenance | None

    def layer_bytes(self) -> dict[str, int]: ...

    def activation_summary(self) -> dict[str, object]: ...

    def summary(self) -> dict[str, object]: ...


def card_paths(output: str | Path) -> tuple[Path, Path]:
    """OUT.card.json and OUT.card.md for a model written to OUT (its .onnx suffix dropped)."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix == ".onnx" else output
    return stem.with_name(stem.name + ".card.json"), stem.with_name(stem.name + ".card.md")


CARD_VERSION = 2


def _granularity(spec: WeightQuant) -> str:
    if spec.group_size:
        return f"per_group({spec.group_size})"
    return "per_tensor" if spec.axis is None else f"per_channel(axis={spec.axis})"


def quantization_card(result: QuantResult, written: ModelDigest | None = None,
                      model_file: str | None = None) -> dict[str, Any]:
    """The card as plain data; `written` is the digest of the model file as written."""
    allocation = {layer.layer: layer for layer in result.allocation.layers} if result.allocation else {}
    layer_bytes = result.layer_bytes()
    method = result.config.weight_method.value
    layers = []
    for spec in result.plan.weights:
        chosen = allocation.get(spec.node)
        layers.append({
            "layer": spec.node,
            "op_type": result.plan.quantized_nodes.get(spec.node),
            "weight": spec.tensor,
            "bits": spec.grid.bits,
            "granularity": _granularity(spec),
            "symmetric": bool((result.qparams.weights[spec].zero_point == 0).all()),
            "method": method if spec.node in result.searched_layers else "rtn",
            "bits_from": (f"rule {result.plan.bits_rules[spec.node]}" if spec.node in result.plan.bits_rules
                          else "allocation" if chosen is not None
                          else result.plan.bits_defaults.get(spec.node, "weight_bits")),
            "sensitivity": ({str(b): d for b, d in chosen.damage.items()} if chosen and chosen.damage
                            else None),
            "activations": result.plan.activation_mode(spec.node),
            "activations_from": _mode_origin(result, spec.node),
            "bytes": layer_bytes.get(spec.node),
        })
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "source": result.source,
        "calibration": {"feeds": result.calibration_feeds, "held_out": result.fidelity.feeds,
                        "activation_method": result.config.method.value,
                        "activation_type": result.config.activation_type.value,
                        "activations": result.activation_summary()},
        "weights": {"reduce_range": result.config.effective_reduce_range,
                    "reduce_range_from": ("config" if result.config.reduce_range is not None
                                          else "this CPU (onnxq.cpu)")},
        "layers": layers,
        "float": [{"node": node, "op_type": op, "reason": result.plan.float_reasons.get(node, "")}
                  for node, op in sorted(result.plan.float_nodes.items())],
        "size": {"float_bytes": result.float_bytes, "quantized_bytes": result.quantized_bytes,
                 "ratio": result.quantized_bytes / result.float_bytes if result.float_bytes else None},
        "fidelity": result.summary()["fidelity"],
        "config": config_to_dict(result.config),
    }
    if result.provenance is not None or written is not None:
        card["provenance"] = {
            **(result.provenance.to_dict() if result.provenance is not None else {}),
            **({"model": {"file": model_file, **written.to_dict()}} if written is not None else {})}
    if result.search is not None:
        search = result.search
        card["search"] = {
            "method": "evolq", "scales": search.scales, "graph": search.graph, "loss": search.loss,
            "scope": search.scope,
            "strategy": search.strategy, "seed": search.seed, "search_feeds": search.search_feeds,
            "selection_feeds": search.selection_feeds, "evaluations": search.evaluations,
            "blocks": [{"groups": len(b.groups), "input": b.input, "evaluations": b.evaluations,
                        "loss_before": b.loss_before, "loss_after": b.loss_after,
                        "selection_before": b.selection_before, "selection_after": b.selection_after,
                        "selection_median_change": b.selection_median_change,
                        "selection_improved_feeds": b.selection_improved,
                        "kept": b.kept} for b in search.blocks],
            "acceptance": None if search.acceptance is None else dataclasses.asdict(search.acceptance)}
    if result.modes is not None:
        modes = result.modes
        card["activation_modes"] = {"measure": modes.measure, "feeds": modes.feeds, "chosen": modes.chosen,
                                    "selection_feeds": modes.selection_feeds,
                                    "candidates": modes.candidates, "static_damage": modes.static_damage,
                                    "improved_feeds": modes.improved_feeds,
                                    "alone_dynamic": modes.alone, "latency_ratio": modes.latency,
                                    "latency_threads": result.config.latency_threads, "why": modes.why}
    if result.allocation is not None:
        card["allocation"] = _allocation_section(result.allocation)
    return card


def _allocation_section(report: AllocationReport) -> dict[str, Any]:
    """The budget, what was used of it, and the checks the allocation went through."""
    section = {"budget": report.budget, "limit": report.limit, "used": report.used,
               "measure": report.measure, "allocator": report.allocator,
               "average_bits": report.average_bits, "feeds": report.feeds,
               "max_drop_steps": [list(step) for step in report.steps]}
    if report.latency_steps:  # max_latency: (predicted, measured) ratio to float per solve
        section["latency_steps"] = [list(step) for step in report.latency_steps]
    if report.uniform is not None:
        check = report.uniform
        section["uniform_check"] = {
            "bits": check.bits, "feeds": check.feeds, "knapsack_damage": check.knapsack_damage,
            "uniform_damage": check.uniform_damage, "uniform_chosen": check.uniform_chosen}
    return section


def _mode_origin(result: QuantResult, layer: str) -> str | None:
    """Why a layer's activations have their mode: a rule, the config, or auto's measurement."""
    if layer in result.plan.dynamic_layers:
        return result.plan.dynamic_layers[layer]
    if layer in result.plan.float_activations:
        return result.plan.float_activations[layer]
    if layer in result.plan.mode_rules:
        return f"rule {result.plan.mode_rules[layer]}"
    if result.plan.activation_mode(layer) == "none":
        return None
    return result.plan.static_reasons.get(layer, f"activations = {result.config.activations.value}")


def card_markdown(card: dict[str, Any]) -> str:
    """The card as a Markdown page."""
    size = card["size"]
    calibration = card["calibration"]
    lines = [f"# Quantization card: {Path(card['source']).name if card['source'] else 'model'}", "",
             f"- size: {size['float_bytes'] / 1e6:.3f} MB -> {size['quantized_bytes'] / 1e6:.3f} MB "
             f"({size['ratio']:.3f}x)",
             _calibration_line(calibration),
             _activations_line(calibration.get("activations"))]
    if "allocation" in card:
        allocation = card["allocation"]
        lines.append(f"- bits allocated by {allocation['allocator']} ({allocation['measure']} damage on "
                     f"{allocation['feeds']} feeds) under {allocation['budget']}: used "
                     f"{allocation['used']:.6g} of {allocation['limit']:.6g}; mean weight bits "
                     f"{allocation['average_bits']:.2f}")
        if "uniform_check" in allocation:
            check = allocation["uniform_check"]
            lines.append(f"- against every layer at {check['bits']} bits (whole models, "
                         f"{check['feeds']} other calibration feeds): knapsack "
                         f"{check['knapsack_damage']:.4g}, "
                         f"uniform {check['uniform_damage']:.4g}: "
                         f"{'uniform' if check['uniform_chosen'] else 'knapsack'} written")
    if "activation_modes" in card:
        modes = card["activation_modes"]
        whole = ", ".join(f"{name} {value:.3g} at {modes['latency_ratio'][name]:.2f}x float latency"
                          for name, value in modes["candidates"].items())
        lines.append(f"- activation modes chosen by measured damage ({modes['measure']}; layers screened on "
                     f"{modes['feeds']} calibration feeds, whole models on "
                     f"{modes['selection_feeds']} others) "
                     f"and latency ({modes['latency_threads']} thread(s)): "
                     f"{modes['chosen']} model, {modes['why']} (whole models: {whole})")
    if "search" in card:
        search = card["search"]
        kept = sum(block["kept"] for block in search["blocks"])
        moved = {"activations": "activation scales", "weights": "weight-scale multipliers",
                 "both": "activation scales and weight-scale multipliers",
                 "auto": "activation scales and, apart, weight-scale multipliers"}[search["scales"]]
        lines.append(f"- {moved} searched by Evol-Q ({search['strategy']}, {search['loss']} loss, "
                     f"{search['scope']}, {search['graph']} graph; seed {search['seed']}): "
                     f"{search['evaluations']} evaluations on "
                     f"{search['search_feeds']} calibration feeds, {kept} of {len(search['blocks'])} "
                     f"blocks changed (each kept only if it also improved {search['selection_feeds']} "
                     f"other calibration feeds: their pooled loss and most feeds' own)")
        if search.get("acceptance"):
            lines.append(f"- scale search {search['acceptance']['reason']}")
    lines += _provenance_lines(card.get("provenance"))
    lines += ["", "## Fidelity", "", "| output | cosine | min cosine | SQNR dB | top-1 agree |",
              "|---|---|---|---|---|"]
    for output in card["fidelity"]["outputs"]:
        top1 = output["top1_agreement"]
        lines.append(f"| {output['name']} | {output['cosine']:.5f} | {output['min_cosine']:.5f} | "
                     f"{output['sqnr_db']:.1f} | {'-' if top1 is None else f'{top1:.3f}'} |")
    if not card["fidelity"]["outputs"]:
        lines.append("| (not measured: no data) | | | | |")
    lines += ["", "## Quantized layers", "",
              "| layer | op | bits | from | granularity | symmetric | method | activations | bytes | "
              "damage by bits |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for layer in card["layers"]:
        damage = layer["sensitivity"]
        damage_text = ", ".join(f"{b}: {d:.3g}" for b, d in damage.items()) if damage else "-"
        lines.append(f"| {layer['layer']} | {layer['op_type']} | {layer['bits']} | {layer['bits_from']} | "
                     f"{layer['granularity']} | {layer['symmetric']} | {layer['method']} | "
                     f"{_mode_text(layer)} | "
                     f"{layer['bytes'] if layer['bytes'] is not None else '-'} | {damage_text} |")
    lines += ["", "## Left float", "", "| node | op | reason |", "|---|---|---|"]
    lines += [f"| {f['node']} | {f['op_type']} | {f['reason']} |" for f in card["float"]]
    return "\n".join(lines) + "\n"


def _calibration_line(calibration: dict[str, Any]) -> str:
    if not calibration["feeds"]:
        return "- calibration: no data (dynamic activations only); fidelity not measured"
    return (f"- calibration: {calibration['feeds']} feeds, activations {calibration['activation_type']} "
            f"by {calibration['activation_method']}; fidelity on {calibration['held_out']} held-out feeds")


def _activations_line(activations: dict[str, Any] | None) -> str:
    if not activations:
        return "- activations: static"
    counts = ", ".join(f"{mode} x{n}" for mode, n in activations["layers"].items()) or "no layers"
    return f"- activations = {activations['mode']}: {counts} (dynamic: quantized per batch at run time)"


def _mode_text(layer: dict[str, Any]) -> str:
    if layer.get("activations_from"):
        return f"{layer['activations']} ({layer['activations_from']})"
    return layer.get("activations", "-")


def _provenance_lines(provenance: dict[str, Any] | None) -> list[str]:
    if not provenance:
        return []
    lines = []
    if "model" in provenance:
        lines.append(f"- model file {provenance['model']['file']}: sha256 {provenance['model']['sha256']}")
    if "float_model" in provenance:
        lines.append(f"- float model: sha256 {provenance['float_model']['sha256']}")
    if "calibration" in provenance:
        calibration = provenance["calibration"]
        lines.append(f"- calibration data ({calibration['origin']}): content sha256 {calibration['sha256']}")
    if "versions" in provenance:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in provenance["versions"].items()))
    return lines


def write_card(result: QuantResult, output: str | Path,
               written: ModelDigest | None = None) -> tuple[Path, Path]:
    """Write OUT.card.json and OUT.card.md atomically; returns their paths. `written`: the
    digest of the model file at OUT, recorded so that `onnxq check --card` can match it."""
    json_path, markdown_path = card_paths(output)
    card = quantization_card(result, written, Path(output).name)
    model_io.write_text_atomic(json_path, json.dumps(card, indent=2, default=_plain) + "\n")
    model_io.write_text_atomic(markdown_path, card_markdown(card))
    return json_path, markdown_path


def _plain(value: object) -> object:
    """numpy scalars as Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
