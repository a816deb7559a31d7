"""The stage pipeline, the weight-searcher registry, budgets, the bias corrector and the pattern
matcher, each on the small real graphs of graphs.py run through ONNX Runtime."""

import dataclasses

import numpy as np
import pytest

import onnxq
from graphs import small_cnn, small_cnn_feeds, tiny_attention
from onnxq.api import stages_for
from onnxq.bits.budgets import BUDGET_KEYS, AverageBits, Bops, MaxDrop, SizeMB, SizeRatio, budget_from
from onnxq.config import ALLOCATION_BUDGETS, ComqConfig, QuantConfig, RtnConfig, WeightMethod
from onnxq.errors import ConfigError
from onnxq.index import ModelIndex
from onnxq.patterns import matches, nodes_matching
from onnxq.qparams import round_to_nearest_weight
from onnxq.stages.allocate import Allocation
from onnxq.stages.bias import BiasCorrector
from onnxq.stages.prepare import load_state, prepare_state
from onnxq.stages.sequential_comq import SequentialComq
from onnxq.state import run_stages
from onnxq.weights.registry import register, searcher_for
from onnxq.weights.rtn import RoundToNearest
from onnxq.weights.search_comq import ComqSearcher


def _prepared(config: QuantConfig, feeds=None):
    state = load_state(small_cnn(), feeds or small_cnn_feeds(12), config)
    prepare_state(state)
    return state


class _Recorder:
    """A stage that watches the graph input and one activation during the calibration pass."""

    name = "record"

    def __init__(self) -> None:
        self.seen: dict[str, list[np.ndarray]] = {"first": [], "last": []}
        self.ran_after_observe = False

    def observe(self, state):
        watcher = self

        class Keep:
            def __init__(self, key):
                self.key = key

            def update(self, array):
                watcher.seen[self.key].append(array)

        return {state.plan.stats_tensors[0]: [Keep("first")], state.plan.stats_tensors[-1]: [Keep("last")]}

    def run(self, state):
        self.ran_after_observe = bool(self.seen["first"])


def test_run_stages_observes_once_for_every_stage_then_runs_them_in_order():
    feeds = small_cnn_feeds(12)
    state = _prepared(QuantConfig(holdout=2), feeds)
    first, second = _Recorder(), _Recorder()
    run_stages(state, [first, second])
    for recorder in (first, second):
        assert recorder.ran_after_observe
        assert len(recorder.seen["first"]) == len(recorder.seen["last"]) == len(state.calibration) == 10
    # Both stages saw the same arrays of the same single pass, one per calibration feed.
    assert all(np.array_equal(a, b) for a, b in zip(first.seen["first"], second.seen["first"], strict=True))
    assert len({a.tobytes() for a in first.seen["first"]}) == 10
    assert set(state.seconds) == {"calibrate", "record"}


def test_stages_follow_the_config():
    names = [stage.name for stage in stages_for(_prepared(QuantConfig()))]
    assert names == ["ranges", "weights", "bias", "emit", "verify", "latency"]
    untimed = stages_for(_prepared(QuantConfig(measure_latency=False)))
    assert "latency" not in [stage.name for stage in untimed]
    with_budget = stages_for(_prepared(QuantConfig(avg_bits=6.0)))
    assert any(isinstance(stage, Allocation) for stage in with_budget)
    sequential = stages_for(_prepared(QuantConfig(weight_method=WeightMethod.COMQ, comq_sequential=True)))
    assert any(isinstance(stage, SequentialComq) for stage in sequential)


def test_registry_builds_the_searcher_of_each_config_type():
    state = _prepared(QuantConfig())
    assert isinstance(searcher_for(RtnConfig(), state.index, state.plan.weights), RoundToNearest)
    assert isinstance(searcher_for(ComqConfig(), state.index, state.plan.weights), ComqSearcher)

    @dataclasses.dataclass(frozen=True)
    class Unregistered:
        pass

    with pytest.raises(TypeError, match="no weight searcher is registered for Unregistered"):
        searcher_for(Unregistered(), state.index, state.plan.weights)
    with pytest.raises(ValueError, match="already registered"):
        register(RtnConfig)(RoundToNearest)


def test_round_to_nearest_searcher_caches_per_bits_and_matches_the_numeric_core():
    state = _prepared(QuantConfig())
    searcher = RoundToNearest(RtnConfig(), state.index, state.plan.weights)
    spec = state.plan.weights[0]
    weight = state.index.constant(spec.node, spec.input_index)
    for bits in (8, 4):
        params = searcher.params(spec.at_bits(bits))
        expected = round_to_nearest_weight(weight, spec.at_bits(bits))
        assert np.array_equal(params.codes, expected.codes)
        assert searcher.params(spec.at_bits(bits)) is params
    assert searcher.params(spec.at_bits(4)).codes.max() <= 7


def test_comq_searcher_falls_back_to_round_to_nearest_without_data():
    state = _prepared(QuantConfig(weight_bits=4))
    searcher = ComqSearcher(ComqConfig(), state.index, state.plan.weights)
    assert searcher.searched_layers == {spec.node for spec in state.plan.weights}
    assert set(searcher.observers())  # it watches the layers' inputs
    spec = state.plan.weights[0]
    rtn = round_to_nearest_weight(state.index.constant(spec.node, spec.input_index), spec)
    assert np.array_equal(searcher.params(spec).codes, rtn.codes)  # no Gram matrix saw data


def test_comq_searcher_lowers_the_reconstruction_error_after_calibration():
    state = _prepared(QuantConfig(weight_bits=4, weight_method=WeightMethod.COMQ))
    searcher = ComqSearcher(state.config.comq, state.index, state.plan.weights)
    run_stages(state, [_Watching(searcher.observers())])
    spec = state.plan.weights[-1]  # the Gemm
    gram = searcher.grams[spec.node]
    weight = state.index.constant(spec.node, spec.input_index)
    rtn = round_to_nearest_weight(weight, spec).dequantized(spec.axis)
    searched = searcher.params(spec).dequantized(spec.axis)

    hessian = gram.hessian.reshape(-1, weight.shape[1], weight.shape[1])[0]

    def error(q):
        delta = (weight - q).astype(np.float64)
        return float(np.trace(delta @ hessian @ delta.T))

    assert error(searched) < error(rtn)


class _Watching:
    name = "watch"

    def __init__(self, observers):
        self._observers = observers

    def observe(self, state):
        return self._observers

    def run(self, state):
        pass


def test_bias_corrector_matches_the_formula_and_is_empty_when_disabled():
    state = _prepared(QuantConfig())
    corrector = BiasCorrector(state.index, state.plan, enabled=True)
    assert {spec.node for spec in corrector.correctable} == {"conv1", "conv2", "fc"}
    run_stages(state, [_Watching(corrector.observers())])
    spec = next(s for s in state.plan.weights if s.node == "fc")
    weight = state.index.constant("fc", spec.input_index)
    params = round_to_nearest_weight(weight, spec)
    bias_spec = corrector.by_layer["fc"]
    mean = corrector.input_means[bias_spec.activation].mean
    error = params.dequantized(spec.axis) - weight
    expected = state.index.constant("fc", bias_spec.input_index) - (error @ mean if spec.axis == 0
                                                                    else error.T @ mean)
    np.testing.assert_allclose(corrector.for_layer(spec, params), expected, rtol=1e-5, atol=1e-7)
    assert BiasCorrector(state.index, state.plan, enabled=False).correctable == {}


def test_budgets_are_typed_and_cover_every_config_field():
    assert BUDGET_KEYS == ALLOCATION_BUDGETS
    assert budget_from(QuantConfig()) is None
    assert budget_from(QuantConfig(avg_bits=4.5)) == AverageBits(4.5)
    assert budget_from(QuantConfig(max_size_mb=2.0)) == SizeMB(2.0)
    assert budget_from(QuantConfig(max_size_ratio=0.2)) == SizeRatio(0.2)
    assert budget_from(QuantConfig(max_bops=1.0)) == Bops(1.0)
    assert budget_from(QuantConfig(max_drop=0.01)) == MaxDrop(0.01)
    with pytest.raises(ConfigError, match="avg_bits must be > 0"):
        AverageBits(0.0)


def test_pattern_matcher_by_op_type_name_and_glob():
    index = ModelIndex(onnxq.model_io.to_ir(tiny_attention()))
    nodes = list(index.nodes.values())
    assert {n.name for n in nodes if matches(n, "MatMul")} >= {"q_proj", "k_proj"}
    assert [n.name for n in nodes if matches(n, "q_proj")] == ["q_proj"]
    assert {n.name for n in nodes if matches(n, "*_proj")} == {"q_proj", "k_proj"}
    with pytest.raises(ConfigError, match="nothing here"):
        nodes_matching(nodes, "no_such_*", "nothing here")
