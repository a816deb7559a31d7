"""`QuantResult`: a verified quantized model held in memory, and everything that explains it.

Made by `onnxq.quantize` from the run's final state; `save` writes the model atomically (never
over its source) with its quantization card beside it (onnxq.report.card).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxq import model_io
from onnxq.bits import sizes
from onnxq.bits.allocation import AllocationReport
from onnxq.config import QuantConfig, config_to_dict
from onnxq.plan import QuantPlan
from onnxq.qparams import QParams
from onnxq.report.card import card_paths, write_card
from onnxq.report.provenance import Provenance, model_digest
from onnxq.scoring.fidelity import FidelityReport
from onnxq.stages.activation_modes import ModeReport
from onnxq.stages.evolq import SearchReport
from onnxq.stages.latency import LatencyReport


@dataclass
class QuantResult:
    """A verified quantized model and everything that explains it.

    `searched_layers`: the layers whose weights the configured searcher chose (the others were
    rounded to nearest); `seconds`: wall time per stage.
    """

    model: onnx.ModelProto
    plan: QuantPlan
    qparams: QParams
    config: QuantConfig
    fidelity: FidelityReport
    calibration_feeds: int
    float_bytes: int
    quantized_bytes: int
    searched_layers: frozenset[str] = frozenset()
    seconds: dict[str, float] = field(default_factory=dict)
    source: str | None = None
    allocation: AllocationReport | None = None
    search: SearchReport | None = None
    modes: ModeReport | None = None
    latency: LatencyReport | None = None
    provenance: Provenance | None = None

    def save(self, path: str | Path, card: bool = True) -> Path:
        """Write the model atomically, and its quantization card beside it (OUT.card.json and
        OUT.card.md); refuses to write over the source model."""
        path = model_io.check_output_path(self.source, path)
        for card_path in card_paths(path) if card else ():
            model_io.check_output_path(self.source, card_path)
        model_io.save_model_atomic(self.model, path, external_data=model_io.has_external_data(self.source))
        if card:
            write_card(self, path, model_digest(path))
        return path

    def layer_bytes(self) -> dict[str, int]:
        """Bytes on disk of each quantized layer (codes, scales, zero points, bias), measured on
        the written model."""
        return sizes.layer_bytes(self.model, self.plan)

    def activation_summary(self) -> dict[str, object]:
        """The activation mode asked for and how many weight layers got each mode."""
        modes = Counter(self.plan.activation_mode(spec.node) for spec in self.plan.weights)
        summary = {"mode": self.config.activations.value, "layers": dict(sorted(modes.items()))}
        if self.modes is not None:
            summary["auto"] = {"measure": self.modes.measure, "feeds": self.modes.feeds,
                               "selection_feeds": self.modes.selection_feeds,
                               "chosen": self.modes.chosen, "damage": self.modes.candidates,
                               "improved_feeds": self.modes.improved_feeds,
                               "latency_ratio": self.modes.latency, "why": self.modes.why}
        return summary

    def summary(self) -> dict[str, object]:
        """A JSON-ready account of what was done and how well it went."""
        quantized_ops = Counter(self.plan.quantized_nodes.values())
        float_ops = Counter(self.plan.float_nodes.values())
        float_reasons = Counter(self.plan.float_reasons.values())
        return {
            "config": config_to_dict(self.config),
            "quantized_ops": dict(sorted(quantized_ops.items())),
            "float_ops": dict(sorted(float_ops.items())),
            "float_reasons": dict(sorted(float_reasons.items())),
            "weights_quantized": len(self.plan.weights),
            "activations": self.activation_summary(),
            "activation_groups": len(self.plan.activation_groups),
            "calibration_feeds": self.calibration_feeds,
            "fidelity": {"feeds": self.fidelity.feeds, "held_out": self.fidelity.held_out,
                         "measured": self.fidelity.feeds > 0,
                         "outputs": [dataclasses.asdict(o) for o in self.fidelity.outputs]},
            "float_bytes": self.float_bytes,
            "quantized_bytes": self.quantized_bytes,
            "size_ratio": self.quantized_bytes / self.float_bytes if self.float_bytes else None,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "weight_bits": dict(sorted(Counter(spec.grid.bits for spec in self.plan.weights).items())),
            "allocation": None if self.allocation is None else {
                "budget": self.allocation.budget, "limit": self.allocation.limit,
                "used": self.allocation.used, "average_bits": self.allocation.average_bits,
                "latency_steps": [list(step) for step in self.allocation.latency_steps],
                "uniform_check": None if self.allocation.uniform is None else {
                    "bits": self.allocation.uniform.bits,
                    "knapsack_damage": self.allocation.uniform.knapsack_damage,
                    "uniform_damage": self.allocation.uniform.uniform_damage,
                    "uniform_chosen": self.allocation.uniform.uniform_chosen}},
            "search": None if self.search is None else {
                "method": "evolq", "scales": self.search.scales, "graph": self.search.graph,
                "loss": self.search.loss,
                "scope": self.search.scope, "evaluations": self.search.evaluations,
                "blocks": len(self.search.blocks),
                "blocks_kept": sum(b.kept for b in self.search.blocks),
                "acceptance": None if self.search.acceptance is None else {
                    "accepted": self.search.acceptance.accepted, "reason": self.search.acceptance.reason,
                    "chosen": self.search.acceptance.chosen}},
            "latency": None if self.latency is None else self.latency.summary(),
        }
