"""`max_latency` as a budget of the bit allocation: the knapsack with a side limit against
brute force, the per-layer table's arithmetic and attribution (pure), and the whole pipeline on
a small CNN through ONNX Runtime with budgets far from the measured values (no assertion here
depends on how fast this machine is at the moment)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import onnxq
from graphs import small_cnn, small_cnn_feeds
from onnxq import QuantConfig
from onnxq.bits.knapsack import Knapsack, SideLimit, brute_force, solve
from onnxq.bits.latency_costs import LatencyTable, attribute, layer_shares
from onnxq.errors import ConfigError
from onnxq.scoring.latency import NodeTime

CANDIDATES = (2, 4, 8)


def _problem(rng: np.random.Generator, groups: int) -> tuple[Knapsack, float]:
    elements = rng.integers(10, 1000, size=groups)
    size = (elements[:, None] * np.array(CANDIDATES)[None, :]).astype(float)
    damage = (rng.random((groups, 1)) * 4.0 ** -np.array(CANDIDATES)[None, :]
              * rng.uniform(0.5, 2, (groups, 3)))
    # low bits are slower for some layers (a float kernel behind a DQ), faster for others
    latency = rng.uniform(0.1, 3.0, (groups, 3))
    limit = rng.uniform(latency.min(axis=1).sum(), latency.max(axis=1).sum())
    problem = Knapsack(CANDIDATES, damage, size, (SideLimit("max_latency", latency, limit),))
    return problem, rng.uniform(problem.cheapest, problem.dearest)


@pytest.mark.parametrize("seed", range(12))
def test_milp_with_a_latency_side_limit_equals_brute_force(seed):
    problem, budget = _problem(np.random.default_rng(seed), groups=5)
    expected = brute_force(problem, budget)
    if expected is None:
        with pytest.raises(ConfigError, match="no allocation fits the budget"):
            solve(problem, budget)
        return
    found = solve(problem, budget)
    assert found.cost <= budget + 1e-9 and problem.within_side_limits(found.bits)
    assert found.damage == pytest.approx(expected.damage, rel=1e-9, abs=1e-15)


def test_the_side_limit_changes_the_choice():
    damage = np.array([[1.0, 0.1, 0.0], [1.0, 0.1, 0.0]])
    size = np.array([[2.0, 4.0, 8.0], [2.0, 4.0, 8.0]])
    latency = np.array([[1.0, 5.0, 1.0], [1.0, 1.0, 1.0]])  # layer 0 at 4 bits: a slow float kernel
    free = Knapsack(CANDIDATES, damage, size)
    assert solve(free, 12.0).bits == (4, 8)
    limited = dataclasses.replace(free, side=(SideLimit("max_latency", latency, 3.0),))
    assert solve(limited, 12.0).bits == (8, 4)


def test_the_table_predicts_from_its_anchor():
    table = LatencyTable({"a": {4: 3.0, 8: 1.0}, "b": {4: 0.5, 8: 1.0}}, reference_bits=8,
                         reference_ms=10.0, float_ms=12.0)
    assert table.predicted_ms({"a": 8, "b": 8}) == pytest.approx(10.0)
    assert table.predicted_ms({"a": 4, "b": 4}) == pytest.approx(11.5)
    # within 1.0x float: the layers may take 12 - (10 - 2) = 4 ms together
    assert table.layer_limit_ms(1.0) == pytest.approx(4.0)
    assert table.fastest_ms() == pytest.approx(9.5)  # a at 8 bits, b at 4: 10 + 0 - 0.5


def test_dequantize_nodes_are_shared_between_the_layers_they_feed():
    result = onnxq.quantize(small_cnn(), small_cnn_feeds(12),
                            QuantConfig(weight_bits=4, measure_latency=False))
    layers = [spec.node for spec in result.plan.weights]
    shares = layer_shares(result.model, layers)
    assert shares["conv1"] == {"conv1": 1.0}
    weight_dq = [node.name for node in result.model.graph.node
                 if node.op_type == "DequantizeLinear" and node.input[0] == "w2_q"]
    assert shares[weight_dq[0]] == {"conv2": 1.0}
    # a grouped Conv weight is reshaped behind its DQ: the Reshape is the layer's too
    reshapes = [node.name for node in result.model.graph.node if node.op_type == "Reshape"
                and node.input[0] == weight_dq[0]]
    assert reshapes  # the default group size applies below 8 bits
    assert all(shares[name] == {"conv2": 1.0} for name in reshapes)
    # p1 feeds conv2 and the residual Add: its DQ belongs to conv2 only (Add is no layer)
    times = [NodeTime("conv2", "Conv", 2.0), NodeTime(weight_dq[0], "DequantizeLinear", 0.5),
             NodeTime("relu1", "Relu", 9.0)]
    assert attribute(times, shares, layers) == {"conv1": 0.0, "conv2": 2.5, "fc": 0.0}


def test_a_loose_latency_budget_is_met_and_reported():
    result = onnxq.quantize(small_cnn(), small_cnn_feeds(12), QuantConfig(avg_bits=5, max_latency=50.0))
    report = result.allocation
    assert len(report.latency_steps) == 1
    predicted, measured = report.latency_steps[0]
    assert 0 < measured <= 50.0 and predicted > 0
    assert result.summary()["allocation"]["latency_steps"] == [[predicted, measured]]


def test_max_latency_alone_allocates_bits():
    result = onnxq.quantize(small_cnn(), small_cnn_feeds(12), QuantConfig(weight_bits=4, max_latency=50.0))
    assert result.allocation is not None and result.allocation.budget == "max_latency"
    # the least damaging bits that run fast enough: 8 bits wherever 8 is within the budget
    assert set(result.allocation.bits.values()) == {8}


def test_an_impossible_latency_budget_is_one_line(tmp_path):
    model = tmp_path / "cnn.onnx"
    model.write_bytes(small_cnn().SerializeToString())
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([feed["x"] for feed in small_cnn_feeds(12)]))
    out = tmp_path / "out.onnx"
    run = subprocess.run([sys.executable, "-m", "onnxq", "quantize", model, out, "--calib", calib,
                          "--avg-bits", "5", "--max-latency", "0.001"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_latency" in lines[0] and "cannot be met" in lines[0], run.stderr
    assert not out.exists()


def test_a_latency_budget_the_size_budget_rules_out_says_which_two_conflict():
    from onnxq.stages.allocate import _latency_not_met

    both = _latency_not_met(QuantConfig(max_size_ratio=0.23, max_latency=1.0), None, 0.66)
    assert "max_latency 1 and max_size_ratio 0.23 cannot both be met" in str(both)
    alone = _latency_not_met(QuantConfig(max_size_ratio=0.23, max_latency=0.5), None, 0.66)
    assert ("cannot be met within max_size_ratio 0.23: the fastest allocation is predicted at 0.66x"
            in str(alone))
