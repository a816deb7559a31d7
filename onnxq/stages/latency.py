"""The last stage: how fast the written model runs against the float model, on this machine.

A quantized model is not faster by construction: ORT runs a QDQ layer in integers only where
its fusions match, and a 4-bit Conv weight, an 8-bit table behind DequantizeLinear -> Gather or
a small model's Q/DQ overhead can make the whole model slower than float (uniform W4
EfficientNet-Lite0: about 4x). So the float model and the written one are timed side by side
(onnxq.scoring.latency: interleaved rounds, p50, `latency_threads` intra-op threads, on the
first held-out feed) and the summary reports the ratio. When the written model is slower, ORT's
profile of it names the layers responsible: the planned layers ORT ran with a float kernel
(their weights dequantized on every run), slowest first, and the time spent in
DequantizeLinear.

A timing is a property of this machine at this moment, not of the model: it goes to the summary
and the result, not into the card, so that the same inputs still give a byte-identical card.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxq.report.kernels import INTEGER_KERNELS
from onnxq.scoring.latency import NodeTime, Timing, latency_ratios, node_times_ms
from onnxq.state import Observers, QuantState

SLOW_LAYERS_SHOWN = 5


@dataclass(frozen=True)
class LatencyReport:
    """p50 (ms) of the float and the written model, timed side by side; when the written one is
    slower, the planned layers ORT ran with float kernels (slowest first) and the time per run
    of its DequantizeLinear nodes."""

    float_ms: float
    quantized_ms: float
    threads: int
    float_kernel_layers: tuple[NodeTime, ...] = ()
    dequantize_ms: float = 0.0

    @property
    def ratio(self) -> float:
        return self.quantized_ms / self.float_ms

    @property
    def slower_than_float(self) -> bool:
        return self.ratio > 1.0

    def summary(self) -> dict[str, object]:
        summary: dict[str, object] = {"float_ms": self.float_ms, "quantized_ms": self.quantized_ms,
                                      "ratio": self.ratio, "threads": self.threads,
                                      "slower_than_float": self.slower_than_float}
        if self.slower_than_float:
            summary["float_kernel_layers"] = [{"layer": t.node, "op": t.op_type, "ms": t.ms}
                                              for t in self.float_kernel_layers]
            summary["dequantize_ms"] = self.dequantize_ms
            summary["why"] = self.why_slower()
        return summary

    def why_slower(self) -> str:
        """One line: what ORT's profile blames, when the written model is slower than float."""
        layers = self.float_kernel_layers
        if not layers:
            return (f"no planned layer runs a float kernel; DequantizeLinear takes "
                    f"{self.dequantize_ms:.2f} ms per run (Q/DQ overhead of a small model)")
        shown = ", ".join(f"{t.node} ({t.op_type}) {t.ms:.2f} ms" for t in layers[:SLOW_LAYERS_SHOWN])
        more = f" and {len(layers) - SLOW_LAYERS_SHOWN} more" if len(layers) > SLOW_LAYERS_SHOWN else ""
        total = sum(t.ms for t in layers)
        return (f"{len(layers)} layers run as float kernels on dequantized weights ({total:.2f} ms "
                f"per run; DequantizeLinear {self.dequantize_ms:.2f} ms): {shown}{more}")


class MeasureLatency:
    name = "latency"

    @staticmethod
    def wanted(state: QuantState) -> bool:
        return state.config.measure_latency and len(state.fidelity_feeds) > 0

    def observe(self, state: QuantState) -> Observers:
        return {}

    def run(self, state: QuantState) -> None:
        if state.quantized is None:  # nothing emitted (a run of the earlier stages only)
            return
        config = state.config
        timing = Timing.for_config(config)
        feed = state.timing_feed
        measured = latency_ratios(state.source or state.float_model, {"quantized": state.quantized},
                                  feed, timing)
        report = LatencyReport(measured.float_ms, measured.ms["quantized"], timing.threads)
        if report.slower_than_float:
            report = _blame(state, report, node_times_ms(state.quantized, feed, timing, "the written model"))
        state.reports["latency"] = report


def _blame(state: QuantState, report: LatencyReport, times: list[NodeTime]) -> LatencyReport:
    planned = {spec.node for spec in state.plan.weights}  # layers with a quantized weight
    float_kernels = tuple(t for t in times if t.node in planned and t.op_type not in INTEGER_KERNELS)
    dequantize = sum(t.ms for t in times if t.op_type == "DequantizeLinear")
    return LatencyReport(report.float_ms, report.quantized_ms, report.threads, float_kernels, dequantize)
