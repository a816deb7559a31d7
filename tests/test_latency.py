"""The written model's latency against float (onnxq.stages.latency, onnxq.scoring.latency):
timed side by side in ORT, reported in the summary and not in the card, and, when slower than
float, the layers ORT's profile shows running float kernels on dequantized weights.

No assertion here depends on which model is faster (these machines are shared); what is
checked is what was measured and how it is reported."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import onnxq
from graphs import small_cnn, small_cnn_feeds
from onnxq import QuantConfig
from onnxq.errors import ConfigError
from onnxq.report.card import quantization_card
from onnxq.report.kernels import INTEGER_KERNELS
from onnxq.scoring.latency import NodeTime, Timing, latency_ratios, node_times_ms
from onnxq.stages.latency import LatencyReport, _blame


def test_the_written_model_is_timed_against_float_and_kept_out_of_the_card():
    result = onnxq.quantize(small_cnn(), small_cnn_feeds(12), QuantConfig())
    latency = result.summary()["latency"]
    assert latency["float_ms"] > 0 and latency["quantized_ms"] > 0 and latency["threads"] == 1
    assert latency["ratio"] == pytest.approx(latency["quantized_ms"] / latency["float_ms"])
    assert latency["slower_than_float"] == (latency["ratio"] > 1)
    assert "latency" in result.seconds
    card = quantization_card(result)
    assert "latency" not in card and "quantized_ms" not in json.dumps(card)


def test_measure_latency_off_skips_the_stage():
    result = onnxq.quantize(small_cnn(), small_cnn_feeds(12), QuantConfig(measure_latency=False))
    assert result.latency is None and result.summary()["latency"] is None
    assert "latency" not in result.seconds


def test_profile_names_the_layers_ort_runs_in_float():
    """At 4 bits ORT has no integer Conv kernel: the profile shows both Convs as float Conv
    nodes under their own names (blamed), the Gemm as an integer kernel (not blamed)."""
    result = onnxq.quantize(small_cnn(), small_cnn_feeds(12),
                            QuantConfig(weight_bits=4, short_row_bits=0, layer_bits=("fc=8",),
                                        measure_latency=False))
    feed = small_cnn_feeds(1, seed=9)[0]
    times = node_times_ms(result.model, feed, Timing(runs=3, warmup=1), "w4")
    by_node = {t.node: t for t in times}
    assert by_node["conv1"].op_type == "Conv" and by_node["conv2"].op_type == "Conv"
    assert by_node["fc"].op_type in INTEGER_KERNELS  # fused: "fc_token_<n>" is named "fc"
    assert all(t.ms >= 0 for t in times)

    class State:  # what _blame reads of the pipeline's state
        plan = result.plan

    blamed = _blame(State(), LatencyReport(1.0, 2.0, 1), times)
    assert {t.node for t in blamed.float_kernel_layers} == {"conv1", "conv2"}
    assert blamed.dequantize_ms >= 0
    assert "2 layers run as float kernels" in blamed.why_slower()


def test_why_slower_without_float_kernels_blames_the_qdq_overhead():
    report = LatencyReport(1.0, 1.2, 1, (), 0.05)
    assert report.slower_than_float and "Q/DQ overhead" in report.why_slower()
    long = LatencyReport(1.0, 3.0, 1, tuple(NodeTime(f"conv{i}", "Conv", 1.0 / (i + 1)) for i in range(7)))
    assert "7 layers" in long.why_slower() and "and 2 more" in long.why_slower()


def test_latency_ratios_time_every_candidate():
    model = small_cnn()
    feed = small_cnn_feeds(1)[0]
    measured = latency_ratios(model, {"same": model}, feed, Timing(rounds=2, runs=3, warmup=1))
    assert set(measured.ratios) == {"same"} and measured.float_ms > 0 and measured.ratios["same"] > 0


def test_tiny_models_get_more_runs_per_round():
    from onnxq.scoring.latency import runs_filling

    timing = Timing(runs=10, min_round_ms=25.0)
    assert runs_filling(timing, 0.0002) == 125  # 0.2 ms: 125 runs fill 25 ms
    assert runs_filling(timing, 0.010) == 10  # 10 ms: the configured runs
    assert runs_filling(timing, 1e-9) == 1000  # at most 100x the configured runs
    assert runs_filling(Timing(runs=10, min_round_ms=0), 0.0002) == 10


@pytest.mark.parametrize("changes, pattern", [
    ({"rounds": 0}, "latency rounds must be at least 1"),
    ({"runs": 0}, "latency runs must be at least 1"),
    ({"warmup": -1}, "latency warmup must be 0 or more"),
    ({"min_round_ms": -1}, "latency min_round_ms must be 0 or more"),
])
def test_bad_timing_values(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Timing(**changes)


def test_cli_summary_reports_latency(tmp_path):
    model = tmp_path / "cnn.onnx"
    model.write_bytes(small_cnn().SerializeToString())
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([feed["x"] for feed in small_cnn_feeds(12)]))
    run = subprocess.run([sys.executable, "-m", "onnxq", "quantize", model, tmp_path / "out.onnx",
                          "--calib", calib, "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["latency"]["ratio"] > 0
    human = subprocess.run([sys.executable, "-m", "onnxq", "quantize", model, tmp_path / "out2.onnx",
                            "--calib", calib], capture_output=True, text=True, timeout=300)
    assert "latency: " in human.stdout and "x float (p50" in human.stdout


class _Feeds(list):
    """Feeds as a CalibrationSet hands them out."""

    def feed(self, index: int) -> dict:
        return self[index]


def test_models_are_timed_on_the_median_size_feed():
    """The deployment's typical input, not the widest: a ratio to float depends on the size."""
    from types import SimpleNamespace

    from onnxq.state import QuantState

    def lines(*widths):
        return _Feeds({"x": np.zeros((1, 3, 48, width), np.float32)} for width in widths)

    calibration = lines(320, 582, 320)
    state = SimpleNamespace(fidelity_feeds=lines(430, 320), calibration=calibration)
    assert QuantState.timing_feed.func(state)["x"].shape[-1] == 320
    state = SimpleNamespace(fidelity_feeds=calibration, calibration=calibration)  # none held out
    assert QuantState.timing_feed.func(state)["x"].shape[-1] == 320
    state = SimpleNamespace(fidelity_feeds=lines(582, 430, 320), calibration=lines(600))
    assert QuantState.timing_feed.func(state)["x"].shape[-1] == 582  # sizes 320 430 582 600
