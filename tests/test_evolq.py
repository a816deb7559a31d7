"""Evol-Q: the evolutionary core on a known optimum, the search graph against emitted models
through ONNX Runtime, blocks of real graphs, reproducibility, and bad options."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxq
from graphs import small_cnn, small_cnn_feeds, tiny_attention, tiny_attention_feeds
from onnxq import model_io
from onnxq.api import stages_for
from onnxq.config import EvolqConfig, QuantConfig, ScaleSearch, config_from_dict
from onnxq.data import open_calibration
from onnxq.emit import emit, emit_options
from onnxq.errors import ConfigError
from onnxq.report.card import card_markdown, quantization_card
from onnxq.scoring.damage import search_loss
from onnxq.scoring.executor import Shared, open_pool
from onnxq.search.blocks import partition
from onnxq.search.bounds import folds, fusion_ceilings
from onnxq.search.evolution import EvolutionSettings, SearchResult, evolve, random_search
from onnxq.search.graph import BLOCK_INPUT, lift_scales, suffix_model, with_outputs
from onnxq.search.keep import decide, relative_changes
from onnxq.search.worker import candidate_scales, score_candidate
from onnxq.stages.evolq import EvolqSearch, _BlockRunner, _split, bias_sources, lifted_blocks, with_scales
from onnxq.stages.prepare import load_state, prepare_state
from onnxq.state import run_stages


def _unfused(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, bytes) else model_io.to_proto(model).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _calibrated(config: QuantConfig, feeds, model=None):
    """A state after every stage before emit (ranges, weights, bias)."""
    state = load_state(model if model is not None else small_cnn(), feeds, config)
    prepare_state(state)
    run_stages(state, [s for s in stages_for(state) if s.name not in ("evolq", "emit", "verify")])
    return state


def test_evolution_finds_a_known_optimum_and_beats_random_search():
    optimum = np.array([0.04, -0.03, 0.02, 0.0, -0.05, 0.01])
    rng = np.random.default_rng(0)
    jagged = 1e-5 * rng.random(64)

    def loss(candidates):  # a bowl with small jags, as a quantized network's loss looks
        bowl = ((candidates - optimum) ** 2).sum(axis=1)
        return bowl + jagged[(np.abs(candidates).sum(axis=1) * 1e3).astype(int) % 64]

    settings = EvolutionSettings(final_sigma=0.005)  # a long budget: a shrinking step refines
    evolved = evolve(loss, 6, 400, settings, np.random.default_rng(1))
    sampled = random_search(loss, 6, 400, settings, np.random.default_rng(1))
    assert evolved.evaluations <= 400 and sampled.evaluations == 400
    assert np.abs(evolved.best - optimum).max() < 0.01
    assert evolved.loss < sampled.loss < evolved.start_loss
    again = evolve(loss, 6, 400, settings, np.random.default_rng(1))
    assert np.array_equal(again.best, evolved.best)


def test_a_lifted_scale_changes_the_output_as_the_emitted_model_with_that_scale():
    feeds = small_cnn_feeds(12)
    state = _calibrated(QuantConfig(holdout=2), feeds)
    lifted = lift_scales(emit(state.model, state.plan, state.qparams), state.plan,
                                    bias_sources(state))
    assert set(lifted.inputs) == {g.stats_tensor for g in state.plan.activation_groups}
    # the classifier's input: its layer has a bias, and a move of its scale reaches the output
    # (a move of c2's is averaged away by the pooling after it on some CPUs' calibration)
    group = state.plan.activation_groups[-1].stats_tensor
    moved = np.asarray(state.qparams.activations[group].scale * 1.25, np.float32)
    session = _unfused(lifted.model)
    scales = {lifted.inputs[g]: lifted.defaults[g] for g in lifted.inputs}
    changed = dict(state.qparams.activations)
    changed[group] = dataclasses.replace(changed[group], scale=np.float32(moved))
    emitted = _unfused(emit(state.model, state.plan, dataclasses.replace(state.qparams, activations=changed)))
    original = _unfused(emit(state.model, state.plan, state.qparams))
    for feed in feeds[:4]:
        at_default = session.run(None, {**feed, **scales})[0]
        np.testing.assert_array_equal(at_default, original.run(None, feed)[0])
        at_moved = session.run(None, {**feed, **scales, lifted.inputs[group]: moved})[0]
        assert not np.allclose(at_moved, at_default, atol=1e-6)
        # the emitted model requantizes its bias with the new input scale; so does the graph
        np.testing.assert_array_equal(at_moved, emitted.run(None, feed)[0])


@pytest.mark.parametrize(("options", "attention"), [
    (dict(), False), (dict(weight_bits=4, short_row_bits=0, weight_group_size=0), False),
    (dict(weight_bits=4, short_row_bits=0, weight_method="comq"), False),
    (dict(weight_bits=4, short_row_bits=0, weight_group_size=16), True)],
    ids=["w8", "w4-per-channel", "w4-comq-groups", "w4-matmulnbits"])
def test_a_lifted_weight_multiplier_changes_the_output_as_the_emitted_model(options, attention):
    """Each weight's multiplier (codes kept) moves the search graph's output exactly as the model
    emitted with that weight's scales times it, its int32 bias re-rounded: 8 bits, 4 bits per
    channel and per group (blocked DequantizeLinear); a MatMulNBits' output within float rounding."""
    feeds = tiny_attention_feeds(12) if attention else small_cnn_feeds(12)
    state = _calibrated(QuantConfig(holdout=2, **options), feeds, tiny_attention() if attention else None)
    layout = emit_options(state.config)
    quantized = emit(state.model, state.plan, state.qparams, layout)
    assert any(node.op_type == "MatMulNBits" for node in quantized.graph) == attention
    lifted = lift_scales(quantized, state.plan, bias_sources(state), state.plan.weights)
    lifted_tensors = sorted(spec.tensor for spec in lifted.weights.values())
    assert lifted_tensors == sorted(w.tensor for w in state.plan.weights)
    session = _unfused(lifted.model)
    defaults = {lifted.inputs[k]: v for k, v in lifted.defaults.items()}
    original = _unfused(emit(state.model, state.plan, state.qparams, layout))
    for key in lifted.weights:
        multiplier = np.asarray(1.07, np.float32)
        emitted = _unfused(emit(state.model, state.plan, with_scales(state.qparams, {key: multiplier},
                                                                      lifted.weights), layout))
        for feed in feeds[:3]:
            at_default = session.run(None, {**feed, **defaults})[0]
            np.testing.assert_array_equal(at_default, original.run(None, feed)[0])
            at_moved = session.run(None, {**feed, **defaults, lifted.inputs[key]: multiplier})[0]
            assert not np.allclose(at_moved, at_default, atol=1e-6)
            if attention:  # MatMulNBits: its output times m, equal up to float rounding
                np.testing.assert_allclose(at_moved, emitted.run(None, feed)[0], rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(at_moved, emitted.run(None, feed)[0])


def test_bias_codes_past_2_to_the_24_are_rounded_in_the_search_graph_as_the_emitter_rounds_them():
    """A bias whose int32 codes pass 2^24 (PP-OCRv4 has 2^27): float32 cannot hold every such
    integer, so the search graph rounds them in double, and equals the emitted model to the bit
    (with float32 rounding it was off by a code of 8, enough to flip later roundings)."""
    feeds = small_cnn_feeds(12)
    state = _calibrated(QuantConfig(holdout=2), feeds)
    spec = next(b for b in state.plan.biases if b.node == "conv2")
    source = bias_sources(state)[spec]
    scale = np.float32(state.qparams.activations[state.plan.group_of(spec.activation).stats_tensor].scale)
    code_scale = np.float32(scale * np.float32(source.weight_scale[0]))

    def as_dequantized(value: np.float32, exact: bool) -> np.float32:  # float32(codes) * scale
        quotient = np.float64(value) / np.float64(code_scale) if exact else np.float32(value / code_scale)
        return np.float32(np.round(quotient)) * code_scale

    # a bias near 2^26 codes that float32 division rounds to another dequantized value
    large = np.float32(2 ** 26 * code_scale)
    while as_dequantized(large, True) == as_dequantized(large, False):
        large = np.nextafter(large, np.float32(np.inf))
    bias = source.bias.astype(np.float32).copy()
    bias[0] = large
    state.qparams.bias_values[spec] = bias
    lifted = lift_scales(emit(state.model, state.plan, state.qparams), state.plan, bias_sources(state),
                         state.plan.weights)
    session = _unfused(lifted.model)
    defaults = {lifted.inputs[k]: v for k, v in lifted.defaults.items()}
    emitted = _unfused(emit(state.model, state.plan, state.qparams))
    conv2 = next(n for n in lifted.model.graph if n.name == "conv2").inputs[2].name
    probe = _unfused(with_outputs(lifted.model, [conv2]))
    emitted_bias = _unfused(with_outputs(emit(state.model, state.plan, state.qparams), ["b2_dq"]))
    for feed in feeds[:3]:
        np.testing.assert_array_equal(session.run(None, {**feed, **defaults})[0], emitted.run(None, feed)[0])
        in_graph = probe.run(None, {**feed, **defaults})[-1]
        np.testing.assert_array_equal(in_graph, emitted_bias.run(None, feed)[-1])
        assert in_graph[0] == as_dequantized(large, True) != as_dequantized(large, False)


def test_a_suffix_from_a_cached_block_input_gives_the_whole_model_outputs():
    feeds = small_cnn_feeds(12)
    state = _calibrated(QuantConfig(holdout=2), feeds)
    lifted = lift_scales(emit(state.model, state.plan, state.qparams), state.plan)
    blocks = partition(state.model, state.plan, min_groups=1, max_blocks=8)
    assert len(blocks) >= 2 and blocks[0].input is None
    planned = sorted(g.stats_tensor for g in state.plan.activation_groups)
    assert sorted(g for b in blocks for g in b.groups) == planned
    scales = {lifted.inputs[g]: lifted.defaults[g] for g in lifted.inputs}
    block = blocks[-1]
    cached = _unfused(with_outputs(lifted.model, [block.input]))
    suffix = suffix_model(lifted.model, block.input, None)
    suffix_session = _unfused(suffix)
    used = {i.name for i in suffix_session.get_inputs()}
    for feed in feeds[:3]:
        whole, block_input = cached.run(None, {**feed, **scales})
        rest = suffix_session.run(None, {BLOCK_INPUT: block_input,
                                         **{k: v for k, v in scales.items() if k in used}})[0]
        np.testing.assert_array_equal(rest, whole)


@pytest.mark.parametrize("graph", ["lifted", "fused"])
def test_search_undoes_a_spoiled_scale_and_keeps_only_what_selection_confirms(graph):
    """The classifier's input scale 3x too large: the search wins back most of what it cost.
    (At 8 bits this small CNN's loss is jagged on the scale of a 30% move, and how it jags
    differs between CPUs: the spoil is made large enough to stand out on any of them.)"""
    feeds = small_cnn_feeds(48)
    config = QuantConfig(holdout=4, search=ScaleSearch.EVOLQ,
                         evolq=EvolqConfig(budget=160, loss="mse", search_feeds=24, selection_feeds=12,
                                           sigma=0.2, final_sigma=0.01, graph=graph, scales="activations"))
    unspoiled = _calibrated(config, feeds)
    EvolqSearch().run(unspoiled)
    calibrated_loss = unspoiled.reports["search"].blocks[0].loss_before
    state = _calibrated(config, feeds)
    group = state.plan.activation_groups[-1].stats_tensor  # the classifier's input
    good = float(state.qparams.activations[group].scale)
    state.qparams.activations[group] = dataclasses.replace(state.qparams.activations[group],
                                                           scale=np.float32(good * 3))
    EvolqSearch().run(state)
    report = state.reports["search"]
    block = next(b for b in report.blocks if group in b.groups)
    assert block.kept
    assert block.loss_before > 2 * calibrated_loss  # the spoil costs loss ...
    won_back = (block.loss_before - block.loss_after) / (block.loss_before - calibrated_loss)
    assert won_back > 0.8  # ... and the search wins most of it back
    assert float(state.qparams.activations[group].scale) < 2 * good  # the scale moved back
    for block in report.blocks:  # kept exactly when the search loss, the pooled selection loss
        improved = block.loss_after < block.loss_before  # and the median selection feed's fell
        confirmed = (block.selection_after is not None and block.selection_after < block.selection_before
                     and 2 * block.selection_improved > report.selection_feeds)
        assert block.kept == (improved and confirmed)
    acceptance = report.acceptance  # against the spoiled scales, the base this search started from
    assert acceptance.accepted == (acceptance.searched_cosine >= acceptance.base_cosine)
    assert report.evaluations <= 160 + 8 * len(report.blocks)
    assert report.graph == graph


def test_a_fused_candidate_scores_the_model_written_with_its_scales(tmp_path):
    """On the fused graph a candidate's loss is that of the model the emitter writes with the
    candidate's scales, run as ORT optimizes it (integer kernels), on the search feeds."""
    config = QuantConfig(holdout=4, search=ScaleSearch.EVOLQ,
                         evolq=EvolqConfig(loss="mse", search_feeds=16, selection_feeds=8, graph="fused",
                                           scales="both"))
    state = _calibrated(config, small_cnn_feeds(40))
    lifted, blocks = lifted_blocks(state, state.config.evolq.scales)
    search, selection = _split(state, 16, 8)
    runner = _BlockRunner(state, lifted, blocks, search, selection)
    block = blocks[0]
    step = np.linspace(-0.2, 0.2, len(block.groups))
    with open_pool("local", 1) as pool:
        scored = runner._scorer(pool, block, None, np.ones(len(block.groups)))(np.stack([0 * step, step]))
    moved = with_scales(state.qparams, candidate_scales(runner.current, block.groups, step), lifted.weights)
    written = model_io.to_proto(emit(state.model, state.plan, moved, emit_options(state.config)))
    session = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = [state.float_session.run(None, feed) for feed in runner.feeds["search"]]
    outputs = [session.run(None, feed) for feed in runner.feeds["search"]]
    assert scored[1] == pytest.approx(search_loss(config.evolq.loss, reference, outputs), rel=1e-6)
    assert scored[1] != scored[0]  # the move is seen
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(written.SerializeToString(), options, providers=["CPUExecutionProvider"])
    kernels = {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert "QLinearConv" in kernels  # what was scored ran on ORT's integer kernels


def _optimized_ops(model: onnx.ModelProto, tmp_path, name: str) -> list[str]:
    """The op types of ORT's optimized graph of `model`, in order."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / f"{name}.onnx").graph.node]


def test_a_scale_is_capped_where_raising_it_would_leave_a_clip_in_float(tmp_path):
    """ORT folds a ReLU6 (Clip 0..6) into the QuantizeLinear after it only while the Q's range
    stays inside [0, 6]: a candidate scale above the group's ceiling would leave DQ -> Clip -> Q
    in float, so candidates are capped there, and a search keeps ORT's optimized graph as it is."""
    feeds = small_cnn_feeds(40)
    config = QuantConfig(search=ScaleSearch.EVOLQ, evolq=EvolqConfig(budget=40, search_feeds=16,
                                                                      selection_feeds=8))
    state = _calibrated(config, feeds, small_cnn(relu6=True))
    ceilings = fusion_ceilings(state.model, state.plan, state.qparams)
    [(group, ceiling)] = ceilings.items()  # the Clip's group, and no other
    params, grid = state.qparams.activations[group], next(
        g.grid for g in state.plan.activation_groups if g.stats_tensor == group)
    assert folds(ceiling, params.zero_point, grid, 0.0, 6.0)
    assert not folds(np.nextafter(ceiling, np.float32(np.inf)), params.zero_point, grid, 0.0, 6.0)
    current = {group: np.asarray(params.scale, np.float32)}
    past = np.log(float(ceiling) / float(params.scale)) + 0.05
    ops = {}
    for label, caps in (("capped", ceilings), ("uncapped", None)):
        scales = candidate_scales(current, (group,), np.array([past]), caps)
        moved = model_io.to_proto(emit(state.model, state.plan, with_scales(state.qparams, scales),
                                       emit_options(state.config)))
        ops[label] = _optimized_ops(moved, tmp_path, label)
    assert "Clip" in ops["uncapped"] and "Clip" not in ops["capped"]  # the cap is what keeps it folded
    searched = onnxq.quantize(small_cnn(relu6=True), feeds, config)
    base = onnxq.quantize(small_cnn(relu6=True), feeds, QuantConfig())
    assert searched.search.evaluations > 0
    assert _optimized_ops(searched.model, tmp_path, "searched") == \
        _optimized_ops(base.model, tmp_path, "base")


def test_weight_search_undoes_a_spoiled_weight_scale():
    """A weight's scales all 1.25x too large (its codes kept): a search of the weight multipliers
    alone wins back 99% of the loss it cost, and writes the moved scales with the same codes."""
    feeds = small_cnn_feeds(48)
    config = QuantConfig(holdout=4, search=ScaleSearch.EVOLQ,
                         evolq=EvolqConfig(budget=320, loss="mse", search_feeds=24, selection_feeds=12,
                                           sigma=0.1, final_sigma=0.005, weight_sigma=0.1, scales="weights",
                                           max_blocks=1))
    calibrated = _calibrated(config, feeds)
    spec = next(w for w in calibrated.plan.weights if w.node == "conv2")
    state = _calibrated(config, feeds)
    spoiled = state.qparams.weights[spec]
    state.qparams.weights[spec] = dataclasses.replace(spoiled, scale=spoiled.scale * np.float32(1.25))
    EvolqSearch().run(state)
    report = state.reports["search"]
    (block,) = report.blocks
    assert report.scales == "weights" and len(block.groups) == len(state.plan.weights)
    EvolqSearch().run(calibrated)
    calibrated_loss = calibrated.reports["search"].blocks[0].loss_before
    assert block.loss_before > 100 * calibrated_loss  # the spoil costs loss ...
    assert block.kept and block.loss_after - calibrated_loss < 0.01 * (block.loss_before - calibrated_loss)
    assert report.acceptance.accepted  # the held-out feeds find it closer to float too
    ratio = state.qparams.weights[spec].scale / calibrated.qparams.weights[spec].scale
    np.testing.assert_allclose(ratio, 1, atol=0.05)  # moved back to the calibrated scale
    assert state.qparams.weights[spec].codes is spoiled.codes  # codes kept


def test_auto_writes_the_kind_the_held_out_feeds_prefer():
    """scales = auto: an activation search and a weight search from the same base, each as it
    runs alone; the held-out feeds pick the closer of the two (or the base), and that one's
    scales are written. The base has one activation scale and one weight's scales spoiled, so
    that each search finds something to keep."""
    feeds = small_cnn_feeds(48)

    def spoiled(kind: str):
        config = QuantConfig(holdout=4, search=ScaleSearch.EVOLQ, evolq=EvolqConfig(
            scales=kind, budget=160, loss="mse", search_feeds=24, selection_feeds=12, sigma=0.2,
            final_sigma=0.01, weight_sigma=0.1))
        state = _calibrated(config, feeds)
        group = state.plan.activation_groups[-1].stats_tensor
        state.qparams.activations[group] = dataclasses.replace(
            state.qparams.activations[group], scale=state.qparams.activations[group].scale * np.float32(3))
        spec = next(w for w in state.plan.weights if w.node == "conv2")
        state.qparams.weights[spec] = dataclasses.replace(
            state.qparams.weights[spec], scale=state.qparams.weights[spec].scale * np.float32(1.25))
        return state

    runs = {kind: spoiled(kind) for kind in ("activations", "weights", "auto")}
    for state in runs.values():
        EvolqSearch().run(state)
    alone = {kind: runs[kind].reports["search"].acceptance for kind in ("activations", "weights")}
    assert all(acceptance is not None for acceptance in alone.values())  # each kept a block
    auto = runs["auto"].reports["search"]
    assert auto.evaluations == sum(runs[kind].reports["search"].evaluations for kind in alone)
    best = max(alone, key=lambda kind: alone[kind].searched_cosine)
    assert auto.acceptance.chosen == best and auto.acceptance.accepted == alone[best].accepted
    assert auto.acceptance.searched_cosine == alone[best].searched_cosine
    written = runs[best].qparams if alone[best].accepted else spoiled("auto").qparams
    for key, params in written.activations.items():
        assert runs["auto"].qparams.activations[key].scale == params.scale
    for spec, params in written.weights.items():
        np.testing.assert_array_equal(runs["auto"].qparams.weights[spec].scale, params.scale)


def test_both_searches_a_blocks_activation_scales_then_its_weight_multipliers():
    config = QuantConfig(search=ScaleSearch.EVOLQ, evolq=EvolqConfig(scales="both", max_blocks=2))
    state = _calibrated(config, small_cnn_feeds(24))
    lifted, blocks = lifted_blocks(state, state.config.evolq.scales)
    weights = set(lifted.weights)
    kinds = [("weights" if set(b.groups) <= weights else "activations" if not set(b.groups) & weights
              else "mixed") for b in blocks]
    assert "mixed" not in kinds and "weights" in kinds and "activations" in kinds
    searched = [g for b in blocks for g in b.groups]
    assert sorted(searched) == sorted(lifted.inputs)  # every scale once
    for first, second in zip(blocks, blocks[1:], strict=False):  # a block's weights right after its scales
        if second.input == first.input:
            assert set(first.groups).isdisjoint(weights) and set(second.groups) <= weights


@pytest.mark.parametrize("graph", ["lifted", "fused"])
def test_same_seed_gives_a_byte_identical_model(graph):
    feeds = small_cnn_feeds(40)
    config = QuantConfig(search=ScaleSearch.EVOLQ, evolq=EvolqConfig(budget=40, search_feeds=16,
                                                                      selection_feeds=8, graph=graph))
    first = onnxq.quantize(small_cnn(), feeds, config)
    second = onnxq.quantize(small_cnn(), feeds, config)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert first.search.evaluations > 0
    plain = onnxq.quantize(small_cnn(), feeds, QuantConfig())
    kept = [b for b in first.search.blocks if b.kept]
    written = bool(kept) and first.search.acceptance.accepted
    assert (first.model.SerializeToString() != plain.model.SerializeToString()) == written
    card = quantization_card(first)
    json.dumps(card)  # plain data
    acceptance = card["search"]["acceptance"]
    assert acceptance is None or acceptance["reason"] in card_markdown(card)
    assert {"selection_median_change", "selection_improved_feeds"} <= set(card["search"]["blocks"][0])


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_workers_write_the_in_process_model_on_the_fused_graph(executor, monkeypatch):
    """Candidates emitted and scored in worker processes (or Ray actors) give the model the
    search writes in this process, byte for byte, for the same seed."""
    if executor == "ray":
        ray = pytest.importorskip("ray")
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    feeds = small_cnn_feeds(40)
    search = EvolqConfig(budget=40, search_feeds=16, selection_feeds=8, graph="fused")
    alone = onnxq.quantize(small_cnn(), feeds, QuantConfig(search=ScaleSearch.EVOLQ, evolq=search))
    pooled = onnxq.quantize(small_cnn(), feeds, QuantConfig(search=ScaleSearch.EVOLQ, evolq=search,
                                                            workers=2, executor=executor))
    if executor == "ray":
        ray.shutdown()
    assert pooled.search.evaluations == alone.search.evaluations > 0
    assert [b.loss_after for b in pooled.search.blocks] == \
        [b.loss_after for b in alone.search.blocks]
    assert pooled.model.SerializeToString() == alone.model.SerializeToString()


def _pooled_and_per_feed_mse(session, float_model, feeds):
    """Relative output MSE of a session against the float model: pooled over feeds, and per feed."""
    reference = ort.InferenceSession(float_model.SerializeToString(), providers=["CPUExecutionProvider"])
    pairs = [(reference.run(None, f)[0].astype(np.float64), session.run(None, f)[0].astype(np.float64))
             for f in feeds]
    errors = np.array([np.sum((q - r) ** 2) for r, q in pairs])
    energies = np.array([np.sum(r ** 2) for r, _ in pairs])
    return errors.sum() / energies.sum(), errors / energies


def test_keep_rule_rejects_a_block_that_helps_an_outlier_feed_and_hurts_most():
    """Seven ordinary selection feeds and one 4x louder (its activations clip at the calibrated
    ranges). Widening every scale 4x cuts the loud feed's clipping, which dominates the pooled MSE,
    while every ordinary feed gets a 4x coarser grid: the pooled loss falls, most feeds get worse."""
    state = _calibrated(QuantConfig(holdout=2, search=ScaleSearch.EVOLQ), small_cnn_feeds(24))
    selection = small_cnn_feeds(8, seed=5)
    selection[0] = {"x": selection[0]["x"] * 4}
    lifted = lift_scales(emit(state.model, state.plan, state.qparams), state.plan,
                                    bias_sources(state))
    block = partition(state.model, state.plan, 1, 1)[0]  # one block: every activation group
    block = dataclasses.replace(block, groups=tuple(g for g in block.groups if g in lifted.inputs))
    runner = _BlockRunner(state, lifted, [block], small_cnn_feeds(4, seed=6), selection)
    widened = np.full(len(block.groups), np.log(4.0))
    decision = runner._selection(block, runner._suffix(block), SearchResult(widened, 0.0, 1.0, 1, (0.0,)))
    moved = with_scales(state.qparams, candidate_scales(runner.current, block.groups, widened))
    per_feed = []
    for qparams, pooled in ((state.qparams, decision.pooled_before), (moved, decision.pooled_after)):
        session = _unfused(emit(state.model, state.plan, qparams))  # the emitted model, as written
        expected, alone = _pooled_and_per_feed_mse(session, state.float_model, selection)
        np.testing.assert_allclose(pooled, expected, rtol=1e-5)
        per_feed.append(alone)
    assert np.sum(per_feed[1] < per_feed[0]) == decision.improved_feeds
    assert decision.pooled_after < 0.01 * decision.pooled_before  # the old, pooled rule kept it
    assert decision.improved_feeds == 1 and decision.median_change > 1  # the loud feed alone
    assert not decision.kept and "1 of 8 better" in decision.reason


@pytest.mark.parametrize("weighting", ["pooled", "equal"])
def test_search_loss_weighs_feeds_as_configured(weighting):
    """The search loss of a candidate, pooled or the mean of each feed's own, equals the relative
    MSE of the emitted model with those scales, computed here from ORT's outputs."""
    config = QuantConfig(holdout=2, search=ScaleSearch.EVOLQ, evolq=EvolqConfig(feed_weighting=weighting))
    state = _calibrated(config, small_cnn_feeds(24))
    search = small_cnn_feeds(6, seed=5)
    search[0] = {"x": search[0]["x"] * 3}
    lifted = lift_scales(emit(state.model, state.plan, state.qparams), state.plan,
                                    bias_sources(state))
    block = partition(state.model, state.plan, 1, 1)[0]
    block = dataclasses.replace(block, groups=tuple(g for g in block.groups if g in lifted.inputs))
    runner = _BlockRunner(state, lifted, [block], search, [])
    handle = Shared.inline(runner._job(block, runner._suffix(block), "search", 1))
    multipliers = np.linspace(-0.1, 0.2, len(block.groups))
    moved = with_scales(state.qparams, candidate_scales(runner.current, block.groups, multipliers))
    pooled, alone = _pooled_and_per_feed_mse(_unfused(emit(state.model, state.plan, moved)),
                                             state.float_model, search)
    expected = pooled if weighting == "pooled" else alone.mean()
    assert abs(pooled - alone.mean()) > 0.1 * pooled  # the loud feed: the two weightings differ
    np.testing.assert_allclose(score_candidate((handle, multipliers)), expected, rtol=1e-5)


def test_keep_rule_on_paired_feed_losses():
    pooled = dict(pooled_before=1.0, pooled_after=0.9)
    assert decide(**pooled, before=np.array([1.0, 2, 3]), after=np.array([0.9, 1.9, 3.5])).kept
    tie = decide(**pooled, before=np.array([1.0, 2, 3, 4]), after=np.array([0.5, 2.2, 1.5, 4.4]))
    assert tie.median_change < 0 and tie.improved_feeds == 2
    assert not tie.kept  # half the feeds better is not a majority
    assert not decide(1.0, 1.0, np.array([1.0]), np.array([0.5])).kept  # pooled loss must fall
    exact = relative_changes(np.array([0.0, 0.0, 2.0]), np.array([0.0, 1e-9, 1.0]))
    np.testing.assert_array_equal(exact, [0.0, np.inf, -0.5])


def test_a_search_that_makes_held_out_fidelity_worse_writes_the_base_scales():
    """The search and selection feeds are 4x louder than the held-out ones: the search widens the
    scales for them (both its checks agree), the held-out feeds find the model worse, and the
    acceptance writes the base scales: the model equals the one quantized without the search."""
    feeds = small_cnn_feeds(36)
    config = QuantConfig(holdout=4, search=ScaleSearch.EVOLQ,
                         evolq=EvolqConfig(budget=96, search_feeds=20, selection_feeds=10))
    state = _calibrated(config, feeds)
    loud = [{"x": feed["x"] * 4} for feed in state.calibration]
    state.calibration = open_calibration(loud, state.float_model)
    base = model_io.to_proto(emit(state.model, state.plan, state.qparams)).SerializeToString()
    EvolqSearch().run(state)
    report = state.reports["search"]
    assert any(block.kept for block in report.blocks)
    acceptance = report.acceptance
    assert not acceptance.accepted and acceptance.feeds == 4
    assert acceptance.searched_cosine < acceptance.base_cosine
    assert "rejected" in acceptance.reason and f"{acceptance.base_cosine:.5f}" in acceptance.reason
    assert model_io.to_proto(emit(state.model, state.plan, state.qparams)).SerializeToString() == base
    session = _unfused(emit(state.model, state.plan, state.qparams))
    held_out = list(state.held_out)
    reference = _unfused(state.float_model.SerializeToString())
    cosines = [float(np.dot(r.ravel(), q.ravel()) / (np.linalg.norm(r) * np.linalg.norm(q)))
               for r, q in ((reference.run(None, f)[0][0], session.run(None, f)[0][0]) for f in held_out)]
    np.testing.assert_allclose(acceptance.base_cosine, np.mean(cosines), rtol=1e-4)


def _weight_arrays(model: onnx.ModelProto) -> dict[str, bytes]:
    """Codes, scales and zero points of the constant non-bias DequantizeLinear inputs (weights)."""
    initializers = {t.name: t for t in model.graph.initializer}
    int32 = onnx.TensorProto.INT32
    names = [name for node in model.graph.node if node.op_type == "DequantizeLinear"
             and node.input[0] in initializers and initializers[node.input[0]].data_type != int32
             for name in node.input if name in initializers]
    return {name: initializers[name].SerializeToString() for name in names}


@pytest.mark.parametrize("weights", [
    {"weight_bits": 4},
    {"weight_bits": 3, "weight_method": "comq"},
    {"avg_bits": 5.0, "candidate_bits": (2, 4, 8)},
])
def test_search_works_on_top_of_any_weight_searcher_and_leaves_the_weights(weights):
    feeds = small_cnn_feeds(40)
    evolq = EvolqConfig(budget=48, search_feeds=16, selection_feeds=8, sigma=0.1)
    config = QuantConfig(search=ScaleSearch.EVOLQ, evolq=evolq, **weights)
    searched = onnxq.quantize(small_cnn(), feeds, config)
    plain = onnxq.quantize(small_cnn(), feeds, QuantConfig(**weights))
    # three layers: codes, scales, zero points (group-wise ones only where asymmetric)
    assert len(_weight_arrays(plain.model)) >= 8
    assert _weight_arrays(searched.model) == _weight_arrays(plain.model)  # as the searcher left them
    blocks = searched.search.blocks
    assert blocks and all(b.loss_after <= b.loss_before for b in blocks)
    final = blocks[-1].loss_after if blocks[-1].kept else blocks[-1].loss_before
    assert final <= blocks[0].loss_before
    assert min(o.cosine for o in searched.fidelity.outputs) > 0.9


@pytest.mark.parametrize("table, message", [
    ({"evolq": {"budget": 0}}, "evolq budget must be an integer >= 1"),
    ({"evolq": {"budget": 4, "population": 8}}, "must cover one population"),
    ({"evolq": {"loss": "l1"}}, "evolq loss = 'l1' is not one of"),
    ({"evolq": {"scope": "sideways"}}, "evolq scope"),
    ({"evolq": {"sigma": 0.01, "final_sigma": 0.1}}, "final_sigma <= sigma"),
    ({"evolq": {"elite": 8}}, "elite must be in"),
    ({"evolq": {"feed_weighting": "loudest"}}, "evolq feed_weighting = 'loudest' is not one of"),
    ({"evolq": {"feed_weighting": "equal", "loss": "infonce"}}, "needs loss mse or kl"),
    ({"evolq": {"scales": "biases"}},
     "evolq scales = 'biases' is not one of: activations, weights, both, auto"),
    ({"evolq": {"weight_sigma": 0}}, "evolq weight_sigma must be in"),
    ({"evolq": {"graph": "onnx"}}, "evolq graph = 'onnx' is not one of: fused, lifted"),
    ({"evolq": {"graph": "fused", "scope": "local"}}, "scope = local needs graph = lifted"),
    ({"search": "genetic"}, "search = 'genetic' is not one of: none, evolq"),
    ({"workers": 0}, "workers must be an integer >= 1"),
    ({"executor": "slurm"}, "executor must be local or ray"),
    ({"provider": "tpu"}, "provider must be cpu or cuda"),
])
def test_bad_search_options_are_config_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(table)


@pytest.mark.parametrize("flags", [
    ["--search", "bogus"], ["--search-budget", "0"], ["--workers", "0"], ["--executor", "nope"],
    ["--provider", "cuda"], ["--search-scales", "biases"], ["--search-graph", "onnx"],
])
def test_bad_search_flags_are_one_line_errors(tmp_path, flags):
    model, calib = tmp_path / "cnn.onnx", tmp_path / "calib.npz"
    onnx.save(small_cnn(), model)
    np.savez(calib, x=np.random.default_rng(0).normal(0, 1, (12, 3, 16, 16)).astype(np.float32))
    if flags[0] == "--provider" and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    done = subprocess.run([sys.executable, "-m", "onnxq", "quantize", str(model), str(tmp_path / "out.onnx"),
                           "--calib", str(calib), "--search", "evolq", *flags],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: error:"), done.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_a_suffix_starting_at_an_untyped_value_loads():
    """A value made by a pass after shape inference (SmoothQuant's Mul) has no type; a block
    starting there is fed as a float input (MiniLM's search model failed to load before)."""
    model = model_io.to_ir(small_cnn())
    start = next(v for node in model.graph if node.op_type == "MaxPool" for v in node.outputs)
    start.type = None
    suffix = suffix_model(model, start.name, None)
    session = ort.InferenceSession(model_io.to_proto(suffix).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    block_input = next(i for i in session.get_inputs() if i.name == BLOCK_INPUT)
    assert block_input.type == "tensor(float)"
