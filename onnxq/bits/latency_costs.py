"""What each layer costs in time at each candidate bit-width, measured through ONNX Runtime:
the latency side of the bit allocation (`max_latency`).

ORT runs a layer in integers only where its fusions match: an 8-bit Conv becomes QLinearConv,
a 4-bit MatMul MatMulNBits, but a 4-bit Conv stays a float Conv behind a DequantizeLinear of
its weight, run on every inference (EfficientNet-Lite0's depthwise Convs: about 10x their
QLinearConv time). No formula predicts that, so it is measured:

    for each candidate b:  emit the model with every free layer at b bits, profile it in ORT
                           (onnxq.scoring.latency.node_times_ms) and give each layer the time
                           of its own nodes: the compute node (a fused one is named after it)
                           and the DequantizeLinear nodes that feed it, a DQ shared by several
                           layers split evenly between them
    anchor:                the p50 of the model at the highest candidate, timed side by side
                           with the float model (wall time: what the budget is about)

    predicted(bits) = p50(reference) + sum over layers of (t[layer, bits] - t[layer, reference])

A profile attributes time per node but not the interplay (memory traffic, a Q/DQ pair ORT
removes only when both neighbours are integer): the allocation stage measures the model it
chose and tightens the limit when the prediction was optimistic (onnxq.stages.allocate).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx

from onnxq.scoring.latency import NodeTime, Timing, latency_ratios, node_times_ms

Feed = Mapping[str, object]


@dataclass(frozen=True)
class LatencyTable:
    """Per free layer, ms per run at each candidate bit-width (from ORT's profile), and the
    wall-time anchor: p50 of the float model and of the model at `reference_bits`."""

    ms: dict[str, dict[int, float]]
    reference_bits: int
    reference_ms: float
    float_ms: float

    def predicted_ms(self, bits: Mapping[str, int]) -> float:
        """Wall time predicted for the model with these bits on the table's layers."""
        return self.reference_ms + sum(self.ms[layer][b] - self.ms[layer][self.reference_bits]
                                       for layer, b in bits.items())

    def fastest_ms(self) -> float:
        """Wall time predicted with each layer at its fastest bit-width."""
        return self.predicted_ms({layer: min(costs, key=costs.get) for layer, costs in self.ms.items()})

    def layer_limit_ms(self, ratio: float) -> float:
        """What the table's layers may take together so the model runs within `ratio` of float."""
        outside = self.reference_ms - sum(costs[self.reference_bits] for costs in self.ms.values())
        return ratio * self.float_ms - outside


# Nodes between a weight's DequantizeLinear and its layer (a grouped Conv weight's Reshape).
_PASS_THROUGH = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Cast"})


def layer_shares(model: onnx.ModelProto, layers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Node name -> {layer: share of its time}: each layer's own node, and every
    DequantizeLinear feeding a layer, with the shape ops between them (each split evenly among
    the layers it feeds)."""
    wanted = set(layers)
    producer = {output: node for node in model.graph.node for output in node.output}
    fed: dict[str, set[str]] = defaultdict(set)

    def feeding(name: str) -> list[str]:
        """The DQ (and shape ops) that produce tensor `name`, nearest first; [] if no DQ."""
        chain = []
        source = producer.get(name)
        while source is not None and source.op_type in _PASS_THROUGH:
            chain.append(source.name)
            source = producer.get(source.input[0])
        return [*chain, source.name] if source is not None and source.op_type == "DequantizeLinear" else []

    for node in model.graph.node:
        if node.name in wanted:
            for name in node.input:
                for feeder in feeding(name):
                    fed[feeder].add(node.name)
    shares = {name: {name: 1.0} for name in wanted}
    for feeder, consumers in fed.items():
        shares[feeder] = {layer: 1.0 / len(consumers) for layer in consumers}
    return shares


def attribute(times: Sequence[NodeTime], shares: Mapping[str, Mapping[str, float]],
              layers: Sequence[str]) -> dict[str, float]:
    """ms per run of each layer: the shares of the profiled nodes that belong to it."""
    total = dict.fromkeys(layers, 0.0)
    for time in times:
        for layer, share in shares.get(time.node, {}).items():
            total[layer] += share * time.ms
    return total


def measure_latency_table(float_model: object, models: Mapping[int, onnx.ModelProto],
                          layers: Sequence[str], feed: Feed, timing: Timing) -> LatencyTable:
    """Profile the model at each candidate bit-width (`models`: bits -> model with every layer
    of `layers` at those bits) and anchor the table on the highest one's wall time."""
    ms: dict[str, dict[int, float]] = {layer: {} for layer in layers}
    for bits, model in models.items():
        times = node_times_ms(model, feed, timing, f"the model at {bits} bits")
        for layer, value in attribute(times, layer_shares(model, layers), layers).items():
            ms[layer][bits] = value
    reference = max(models)
    anchor = latency_ratios(float_model, {"reference": models[reference]}, feed, timing)
    return LatencyTable(ms, reference, anchor.ms["reference"], anchor.float_ms)
