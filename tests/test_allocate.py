"""Bit allocation: the MILP's choice against brute force, budgets, ties, and the measured
sensitivity of real layers through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from graphs import small_cnn, small_cnn_feeds, tiny_attention
from onnxq import QuantConfig, model_io, quantize
from onnxq.bits.knapsack import Knapsack, brute_force, solve
from onnxq.bits.sensitivity import tied_layers
from onnxq.errors import ConfigError
from onnxq.passes import QDQ_MIN_OPSET, prepare
from onnxq.passes.annotate import annotate
from onnxq.scoring.damage import output_damage

CANDIDATES = (2, 3, 4, 8)


def _random_problem(rng: np.random.Generator, groups: int) -> Knapsack:
    elements = rng.integers(10, 1000, size=groups)
    cost = elements[:, None] * np.array(CANDIDATES)[None, :]
    # damage falls with bits, by a factor of about 4 per bit, with noise
    damage = (rng.random((groups, 1)) * 4.0 ** -np.array(CANDIDATES)[None, :]
              * rng.uniform(0.5, 2, (groups, 4)))
    return Knapsack(CANDIDATES, damage, cost.astype(float))


@pytest.mark.parametrize("seed", range(12))
def test_milp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    problem = _random_problem(rng, groups=int(rng.integers(2, 7)))
    budget = rng.uniform(problem.cheapest, problem.dearest)
    expected = brute_force(problem, budget)
    found = solve(problem, budget)
    assert found.cost <= budget + 1e-9
    assert found.damage == pytest.approx(expected.damage, rel=1e-9, abs=1e-15)


def test_budget_extremes_give_uniform_bits():
    problem = _random_problem(np.random.default_rng(0), groups=5)
    assert solve(problem, problem.cheapest).bits == (2,) * 5
    assert solve(problem, problem.dearest).bits == (8,) * 5


def test_budget_below_the_cheapest_choice_is_an_error():
    problem = _random_problem(np.random.default_rng(1), groups=3)
    with pytest.raises(ConfigError, match="cannot be met"):
        solve(problem, problem.cheapest * 0.9)


def test_damage_measures_are_zero_on_float_and_grow_with_noise():
    rng = np.random.default_rng(0)
    reference = [[rng.normal(size=(1, 10))] for _ in range(8)]
    small = [[r[0] + 0.01 * rng.normal(size=r[0].shape)] for r in reference]
    large = [[r[0] + 0.5 * rng.normal(size=r[0].shape)] for r in reference]
    for measure in ("mse", "kl", "infonce"):
        assert output_damage(measure, reference, reference) == pytest.approx(0.0, abs=1e-12)
        assert output_damage(measure, reference, small) < output_damage(measure, reference, large)


def test_layers_reading_one_tensor_are_tied():
    model = prepare(model_io.to_ir(tiny_attention()), QDQ_MIN_OPSET)
    plan = annotate(model, QuantConfig())
    groups = tied_layers(model, plan)
    nodes = {node.name: node for node in model.graph}
    assert sorted(n for g in groups for n in g) == sorted(s.node for s in plan.weights)
    for group in groups:
        assert len({nodes[name].inputs[0].name for name in group}) == 1
    assert any(len(group) >= 2 for group in groups)  # the Q/K/V projections share their input


@pytest.mark.parametrize("base", ["float", "quantized"])
def test_allocation_meets_the_budget_and_ties_share_bits(base):
    model = tiny_attention()
    feeds = [{"x": np.random.default_rng(i).normal(size=(1, 6, 16)).astype(np.float32)} for i in range(12)]
    result = quantize(model, feeds, QuantConfig(avg_bits=5.0, sensitivity_base=base))
    report = result.allocation
    assert report.used <= report.limit
    elements = sum(layer.elements for layer in report.layers)
    assert sum(layer.bits * layer.elements for layer in report.layers) <= 5.0 * elements
    by_group: dict[int, set[int]] = {}
    for layer in report.layers:
        by_group.setdefault(layer.group, set()).add(layer.bits)
    assert all(len(bits) == 1 for bits in by_group.values())
    assert {spec.node: spec.grid.bits for spec in result.plan.weights} == report.bits
    for layer in report.layers:
        assert layer.damage[2] > layer.damage[8]


def test_sensitivity_ranks_bits_and_allocation_beats_random_on_a_cnn():
    feeds = small_cnn_feeds(24)
    measured = quantize(small_cnn(), feeds, QuantConfig(avg_bits=3.0, candidate_bits=(2, 4, 8)))
    for layer in measured.allocation.layers:
        assert layer.damage[2] > layer.damage[4] > layer.damage[8] >= 0
    random = quantize(small_cnn(), feeds, QuantConfig(avg_bits=3.0, candidate_bits=(2, 4, 8),
                                                      allocator="random", seed=3))
    damage = {layer.layer: layer.damage for layer in measured.allocation.layers}
    check = measured.allocation.uniform  # the knapsack's choice, before the whole-model check
    knapsack = check.knapsack_bits if check is not None else measured.allocation.bits
    chosen = sum(damage[name][bits] for name, bits in knapsack.items())
    randomly = sum(damage[layer.layer][layer.bits] for layer in random.allocation.layers)
    assert chosen <= randomly  # the measured end-to-end comparison is in benchmarks/ (zoo models)


def test_layer_rules_fix_bits_and_float(tmp_path):
    feeds = small_cnn_feeds(8)
    model = small_cnn()
    names = [node.name for node in model.graph.node if node.op_type == "Conv"]
    result = quantize(model, feeds, QuantConfig(weight_bits=4, layer_bits=(f"{names[0]}=8", "Gemm=float")))
    bits = {spec.node: spec.grid.bits for spec in result.plan.weights}
    assert bits[names[0]] == 8
    assert all(bits[name] == 4 for name in names[1:])
    assert not any(op == "Gemm" for op in result.plan.quantized_nodes.values())
    assert "Gemm=float" in " ".join(result.plan.float_reasons.values())
    later = quantize(model, feeds, QuantConfig(layer_bits=("Conv=4", f"{names[0]}=8")))
    assert {spec.node: spec.grid.bits for spec in later.plan.weights}[names[0]] == 8
    with pytest.raises(ConfigError, match="matches no quantizable layer"):
        quantize(model, feeds, QuantConfig(layer_bits=("nothing*=4",)))
    with pytest.raises(ConfigError, match="PATTERN=BITS"):
        QuantConfig(layer_bits=("Conv:4",))
    with pytest.raises(ConfigError, match="one allocation budget"):
        QuantConfig(avg_bits=4, max_size_mb=1)


def test_size_and_bops_budgets_hold_on_the_written_model(tmp_path):
    feeds = small_cnn_feeds(16)
    uniform8 = quantize(small_cnn(), feeds, QuantConfig())
    uniform4 = quantize(small_cnn(), feeds, QuantConfig(weight_bits=4))
    limit = (uniform8.quantized_bytes + uniform4.quantized_bytes) / 2 / 1e6
    sized = quantize(small_cnn(), feeds, QuantConfig(max_size_mb=limit, candidate_bits=(4, 8)))
    assert sized.quantized_bytes <= limit * 1e6
    assert {spec.grid.bits for spec in sized.plan.weights} == {4, 8}  # the budget forces a mix
    ratio = quantize(small_cnn(), feeds, QuantConfig(max_size_ratio=limit * 1e6 / sized.float_bytes,
                                                     candidate_bits=(4, 8)))
    assert ratio.quantized_bytes <= limit * 1e6
    macs = {layer.layer: layer.macs for layer in sized.allocation.layers}
    assert all(m > 0 for m in macs.values())
    gbops = sum(m * 8 * 8 for m in macs.values()) * 0.75 / 1e9
    bops = quantize(small_cnn(), feeds, QuantConfig(max_bops=gbops, candidate_bits=(4, 8)))
    used = sum(layer.macs * layer.bits * 8 for layer in bops.allocation.layers)
    assert used <= gbops * 1e9


def test_max_drop_gives_the_smallest_model_within_the_drop():
    feeds = small_cnn_feeds(24)
    loose = quantize(small_cnn(), feeds, QuantConfig(max_drop=0.05, candidate_bits=(2, 4, 8)))
    tight = quantize(small_cnn(), feeds, QuantConfig(max_drop=0.002, candidate_bits=(2, 4, 8)))
    for result, drop in ((loose, 0.05), (tight, 0.002)):
        assert 1 - result.fidelity.worst_cosine <= drop + 1e-6
    assert loose.allocation.used <= tight.allocation.used
    assert tight.allocation.steps[0][0] == 8.0  # the first step measures all layers at 8 bits


# --- the uniform check -----------------------------------------------------------------------


def test_knapsack_allocation_gives_way_to_a_less_damaging_uniform_one():
    """Two groups, budget enough for both at 4 bits: the knapsack's (2, 8) is written only when
    it measures less damaging as a whole model than (4, 4)."""
    from onnxq.bits.allocation import _against_uniform

    problem = Knapsack((2, 4, 8), damage=np.array([[0.3, 0.1, 0.0], [0.9, 0.2, 0.0]]),
                       cost=np.array([[2.0, 4.0, 8.0], [2.0, 4.0, 8.0]]))
    groups = [["a"], ["b"]]
    allocation = solve(problem, 10.0)
    assert allocation.bits == (2, 8)
    whole = {(2, 8): 0.5, (4, 4): 0.4}
    chosen, check = _against_uniform(problem, allocation, 10.0, groups,
                                     lambda bits, feeds: (whole[(bits["a"], bits["b"])], 0), range(3))
    assert chosen.bits == (4, 4) and check.uniform_chosen and check.bits == 4 and check.feeds == 3
    whole[(4, 4)] = 0.6
    chosen, check = _against_uniform(problem, allocation, 10.0, groups,
                                     lambda bits, feeds: (whole[(bits["a"], bits["b"])], 0), range(3))
    assert chosen.bits == (2, 8) and not check.uniform_chosen


def test_uniform_check_measures_whole_models_and_is_in_the_card():
    """At 5 mean bits the small CNN's knapsack mixes 4 and 8 bits; the check emits that model and
    every layer at 4 bits, and writes the one less damaging on calibration feeds."""
    from onnxq.report.card import quantization_card

    result = quantize(small_cnn(), small_cnn_feeds(30), QuantConfig(avg_bits=5.0, measure_latency=False,
                                                                    holdout=2))
    check = result.allocation.uniform
    assert check is not None and check.bits == 4 and check.feeds == 16
    assert check.knapsack_damage > 0 and check.uniform_damage > 0
    written = set(result.allocation.bits.values())
    assert (written == {4}) == check.uniform_chosen
    card = quantization_card(result)["allocation"]["uniform_check"]
    assert card["uniform_chosen"] == check.uniform_chosen and card["bits"] == 4


def test_uniform_check_trusts_written_bytes_when_the_prediction_is_a_hair_over():
    """A size budget's uniform model predicted 0.5% over the capacity counts as fitting when its
    written file is within the limit, and not when the file is over too."""
    from onnxq.bits.allocation import _against_uniform

    problem = Knapsack((2, 4), damage=np.array([[0.3, 0.1], [0.9, 0.2]]),
                       cost=np.array([[2.0, 4.02], [2.0, 4.02]]))
    groups = [["a"], ["b"]]
    allocation = solve(problem, 8.0)
    assert allocation.bits in ((2, 4), (4, 2))
    whole = {(4, 4): 0.1}

    def probe(written):
        return lambda bits, feeds: (whole.get((bits["a"], bits["b"]), 0.5), written)

    chosen, check = _against_uniform(problem, allocation, 8.0, groups, probe(1000), range(2), file_limit=1000)
    assert chosen.bits == (4, 4) and check.uniform_chosen
    chosen, check = _against_uniform(problem, allocation, 8.0, groups, probe(1001), range(2), file_limit=1000)
    assert chosen.bits == allocation.bits and (check is None or check.bits == 2)
    chosen, check = _against_uniform(problem, allocation, 8.0, groups, probe(1000), range(2))
    assert check is None or check.bits == 2  # no file limit: the prediction alone decides


def test_uniform_check_tries_the_model_weight_bits_writes_first():
    """At b bits the check's uniform candidates are the model `weight_bits = b` writes (a
    group whose rows are no longer than one group at `short_row_bits`), then every group at b.
    A 1x1 Conv over 16 channels has rows of 16 weights: short at group size 64."""
    from onnxq.bits.allocation import _uniform_choices
    from onnxq.bits.budgets import LayerFacts
    from onnxq.bits.sizes import LayerGeometry
    from onnxq.numerics import IntRange
    from onnxq.plan import WeightQuant

    shapes = {"wide": (32, 128, 3, 3), "pointwise": (32, 16, 1, 1)}
    specs = {name: WeightQuant(f"{name}_w", name, 1, 0, IntRange(8, True), block_axis=1) for name in shapes}
    facts = {name: LayerFacts(LayerGeometry("Conv", shape, 0), macs=0) for name, shape in shapes.items()}
    groups = [["wide"], ["pointwise"]]
    choices = _uniform_choices(QuantConfig(weight_group_size=64), groups, specs, facts)
    assert choices(4) == [(4, 8), (4, 4)]
    assert choices(8) == [(8, 8)]
    for config in (QuantConfig(weight_group_size=64, short_row_bits=0), QuantConfig(weight_group_size=8)):
        assert _uniform_choices(config, groups, specs, facts)(4) == [(4, 4)]


def test_average_bits_count_the_container():
    """3-bit codes are stored in int4: at `avg_bits` they cost what 4 bits cost, so the budget
    never buys a mix the file does not have."""
    from onnxq.bits.budgets import AverageBits, BudgetContext, LayerFacts
    from onnxq.bits.sizes import LayerGeometry
    from onnxq.passes.insert_qdq import EmitOptions

    layer = LayerFacts(LayerGeometry("Conv", (32, 128, 3, 3), 0), macs=0)
    context = BudgetContext(layer.elements, 0, EmitOptions())
    budget = AverageBits(4.0)
    assert budget.cost(layer, 3, context) == budget.cost(layer, 4, context) == 4 * layer.elements
    assert budget.cost(layer, 2, context) == 2 * layer.elements  # int2
    assert budget.cost(layer, 8, context) == 8 * layer.elements
    fast = BudgetContext(layer.elements, 0, EmitOptions(low_bit_convs_int8=True))
    assert budget.cost(layer, 4, fast) == 8 * layer.elements  # codes in an int8 container


def test_uniform_check_compares_the_models_as_written_after_sequential_comq():
    """With COMQ, sequential COMQ runs after the allocation; the check measures both models
    after it: the written model's damage is the lower of the two, and the uniform one's is that
    of the model `weight_bits = 4` writes."""
    from pathlib import Path

    from onnxq.config import WeightMethod
    from onnxq.scoring.sessions import open_session
    from onnxq.stages.prepare import load_state

    bundled = Path(__file__).resolve().parents[1] / "models" / "bundled"
    model, calib = bundled / "digit_cnn.onnx", bundled / "digit_cnn_calib.npz"
    base = dict(weight_method=WeightMethod.COMQ, measure_latency=False)
    mixed = quantize(model, calib, QuantConfig(avg_bits=5.0, **base))
    uniform = quantize(model, calib, QuantConfig(weight_bits=4, **base))
    check = mixed.allocation.uniform
    assert check is not None and check.bits == 4
    state = load_state(model, calib, QuantConfig(**base))
    probed = QuantConfig().sensitivity_feeds
    feeds = [state.calibration.feed(i) for i in range(probed, probed + check.feeds)]
    names = state.float_session.output_names
    reference = [state.float_session.run(names, feed) for feed in feeds]

    def damage(proto) -> float:
        session = open_session(proto, "a written model")
        outputs = [session.run(names, feed) for feed in feeds]
        return output_damage(QuantConfig().sensitivity, reference, outputs)

    assert damage(mixed.model) == pytest.approx(min(check.knapsack_damage, check.uniform_damage), rel=1e-5)
    assert damage(uniform.model) == pytest.approx(check.uniform_damage, rel=1e-5)
