"""onnxq.scoring: sessions from every kind of model (and through external data), cached float
outputs, lifted constants against the model with the constant changed, damage measures,
provider errors and the in-process executor. Every model runs through ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxq
from graphs import small_cnn, small_cnn_feeds
from onnxq import model_io
from onnxq.errors import ConfigError, ModelError
from onnxq.report.kernels import INTEGER_KERNELS, optimized_op_counts
from onnxq.scoring import damage, sessions
from onnxq.scoring.executor import Executor, InProcessExecutor
from onnxq.scoring.fidelity import verify
from onnxq.scoring.scorer import Reference, Scorer, feed_key
from onnxq.scoring.sessions import SessionSettings, open_session

NO_OPTIMIZATION = SessionSettings(optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)


def _outputs(session: ort.InferenceSession, feeds) -> list[list[np.ndarray]]:
    return [session.run(None, feed) for feed in feeds]


def _assert_same(a, b) -> None:
    for feed_a, feed_b in zip(a, b, strict=True):
        for x, y in zip(feed_a, feed_b, strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def quantized() -> onnx.ModelProto:
    return onnxq.quantize(small_cnn(), small_cnn_feeds(12)).model


def test_sessions_from_proto_bytes_ir_and_path_agree(tmp_path):
    proto, feeds = small_cnn(), small_cnn_feeds(3)
    path = tmp_path / "cnn.onnx"
    onnx.save(proto, str(path))
    expected = _outputs(ort.InferenceSession(proto.SerializeToString(),
                                             providers=["CPUExecutionProvider"]), feeds)
    for model in (proto, proto.SerializeToString(), model_io.to_ir(proto), path, str(path)):
        _assert_same(_outputs(open_session(model, "the model"), feeds), expected)


def test_a_model_past_the_threshold_opens_through_external_data(monkeypatch):
    proto, feeds = small_cnn(), small_cnn_feeds(3)
    before = proto.SerializeToString()
    expected = _outputs(open_session(proto, "the model"), feeds)
    model = model_io.to_ir(proto)
    monkeypatch.setattr(sessions, "EXTERNAL_DATA_THRESHOLD", 1000)
    for source in (proto, model):
        assert sessions.needs_external_data(source)
        session = open_session(source, "the big model")
        folder = session.onnxq_external_data.name
        data = [p for p in Path(folder).iterdir() if p.suffix == ".data"]
        assert data and data[0].stat().st_size > 1000  # the weights went to the data file
        _assert_same(_outputs(session, feeds), expected)
    assert proto.SerializeToString() == before  # the caller's model is left as it was
    assert model.graph.initializers["w2"].const_value is not None
    _assert_same(_outputs(open_session(model, "the model"), feeds), expected)


def test_load_and_run_failures_are_one_line_model_errors():
    broken = small_cnn()
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ModelError, match="^ONNX Runtime cannot load the broken model: ") as error:
        open_session(broken.SerializeToString(), "the broken model")
    assert "\n" not in str(error.value)
    session = open_session(small_cnn(), "the model")
    bad_feed = {"x": np.zeros((1, 5, 16, 16), np.float32)}
    with pytest.raises(ModelError, match="^ONNX Runtime cannot run the model on the feeds: ") as error:
        sessions.run(session, None, bad_feed, "the model")
    assert "\n" not in str(error.value)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime build has CUDA")
def test_cuda_on_a_cpu_build_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="not available") as error:
        SessionSettings(provider="cuda")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="unknown provider"):
        SessionSettings(provider="tpu")


def test_settings_reach_the_session(tmp_path):
    settings = SessionSettings(threads=1, config_entries={"session.disable_prepacking": "1"},
                               optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    assert settings.config_entries == (("session.disable_prepacking", "1"),)
    path = tmp_path / "optimized.onnx"
    session = Scorer(settings).session(small_cnn(), "the model", optimized_model_path=path)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.get_session_config_entry("session.disable_prepacking") == "1"
    assert onnx.load(str(path)).graph.node


class CountingSession:
    """A real ORT session that counts its runs."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.runs = 0

    def get_outputs(self) -> list:
        return self.session.get_outputs()

    def run(self, names, feed):
        self.runs += 1
        return self.session.run(names, feed)


def test_reference_outputs_are_computed_once_per_feed(quantized):
    feeds = small_cnn_feeds(4)
    counting = CountingSession(open_session(small_cnn(), "the float model"))
    scorer = Scorer()
    reference = scorer.reference(counting, feeds)
    assert counting.runs == 4 and len(reference) == 4
    first = scorer.measure_fidelity(quantized, reference, feeds)
    again = [{name: array.copy() for name, array in feed.items()} for feed in feeds]  # re-read
    second = scorer.measure_fidelity(quantized, reference, again)
    for _ in range(3):  # the allocator's repeated --max-drop checks
        _, report = verify(quantized, reference, again, held_out=True, min_cosine=None)
        assert report == first
    assert first == second
    assert counting.runs == 4
    assert reference.run(["logits"], feeds[0])[0] is reference.run(None, again[0])[0]
    lazily = scorer.reference(counting)
    lazily.run(["logits"], feeds[0])
    lazily.run(["logits"], again[0])
    assert counting.runs == 5
    assert feed_key(feeds[0]) == feed_key(again[0]) != feed_key(feeds[1])


def test_cached_fidelity_equals_fidelity_from_sessions(quantized):
    feeds = small_cnn_feeds(4)
    float_session = open_session(small_cnn(), "the float model")
    _, direct = verify(quantized, float_session, feeds, held_out=True, min_cosine=None)
    reference = Scorer().reference(small_cnn())
    assert isinstance(reference, Reference)
    _, cached = verify(quantized, reference, feeds, held_out=True, min_cosine=None)
    assert cached == direct


def test_lifted_weight_gives_the_outputs_of_the_model_with_that_weight():
    proto, feeds = small_cnn(batchnorm=False), small_cnn_feeds(3)
    weight = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w2"))
    source = model_io.to_ir(proto)
    lifted = Scorer().probe(source, {("conv2", 1): weight})
    name = lifted.input_name("conv2", 1)
    assert name == "onnxq_lift0" and lifted.batch_axis_free
    assert [v.name for v in source.graph.inputs] == ["x"]  # the probe works on a copy
    assert {node.name: node for node in source.graph}["conv2"].inputs[1].name == "w2"
    changed_weight = (weight * 0.5 + 0.01).astype(np.float32)
    changed = onnx.ModelProto()
    changed.CopyFrom(proto)
    for index, initializer in enumerate(changed.graph.initializer):
        if initializer.name == "w2":
            changed.graph.initializer[index].CopyFrom(numpy_helper.from_array(changed_weight, "w2"))
    original = _outputs(open_session(proto, "the model"), feeds)
    expected = _outputs(open_session(changed, "the changed model"), feeds)
    for got, want in ((lifted.run(feeds), original), (lifted.run(feeds, {name: changed_weight}), expected)):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected[0][0], original[0][0])


def test_lifted_scale_and_zero_point_give_the_outputs_of_the_changed_qdq_model(quantized):
    feeds = small_cnn_feeds(3)
    scorer = Scorer(NO_OPTIMIZATION)  # ORT would fuse the constant Q/DQ of one model only
    initializers = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    nodes = {node.name: node for node in quantized.graph.node}
    scale = initializers[nodes["r1_dq"].input[1]]  # shared with other Q/DQ nodes
    zero_point = initializers[nodes["w2_dq"].input[2]]  # int8, per channel
    lifted = scorer.probe(model_io.to_ir(quantized), {("r1_dq", 1): scale, ("w2_dq", 2): zero_point})
    assert [item.default.dtype for item in lifted.lifted] == [np.float32, zero_point.dtype]
    new_scale = (scale * 1.7).astype(np.float32)
    new_zero_point = (zero_point + 3).astype(zero_point.dtype)
    changed = onnx.ModelProto()
    changed.CopyFrom(quantized)
    changed.graph.initializer.extend([numpy_helper.from_array(new_scale, "changed_scale"),
                                      numpy_helper.from_array(new_zero_point, "changed_zp")])
    for node in changed.graph.node:  # only these two nodes read the changed constants
        if node.name == "r1_dq":
            node.input[1] = "changed_scale"
        elif node.name == "w2_dq":
            node.input[2] = "changed_zp"
    original = _outputs(scorer.session(quantized, "the model"), feeds)
    expected = _outputs(scorer.session(changed, "the changed model"), feeds)
    overrides = {lifted.input_name("r1_dq", 1): new_scale, lifted.input_name("w2_dq", 2): new_zero_point}
    _assert_same(lifted.run(feeds), original)
    _assert_same(lifted.run(feeds, overrides), expected)
    assert not np.allclose(expected[0][0], original[0][0])
    with pytest.raises(ConfigError, match="not a lifted input"):
        lifted.run(feeds, {"w2": new_scale})
    with pytest.raises(ConfigError, match="no node named"):
        scorer.probe(model_io.to_ir(quantized), {("missing", 1): scale})


def test_weight_probe_keeps_its_input_names():
    from onnxq.bits.sensitivity import WeightProbe
    from onnxq.config import QuantConfig
    from onnxq.passes import QDQ_MIN_OPSET, prepare
    from onnxq.passes.annotate import annotate

    prepared = prepare(model_io.to_ir(small_cnn()), QDQ_MIN_OPSET)
    plan = annotate(prepared, QuantConfig())
    nodes = {node.name: node for node in prepared.graph}
    biases = {spec.node: spec.input_index for spec in plan.biases}
    defaults = {spec.node: (nodes[spec.node].inputs[spec.input_index].const_value.numpy(),
                            nodes[spec.node].inputs[biases[spec.node]].const_value.numpy()
                            if spec.node in biases else None) for spec in plan.weights}
    probe = WeightProbe(prepared, plan, defaults)
    assert sorted(probe.defaults) == sorted(
        [f"onnxq_probe_w{n}" for n in range(len(defaults))]
        + [f"onnxq_probe_b{n}" for n, layer in enumerate(defaults) if layer in biases])
    feeds = small_cnn_feeds(3)
    float_outputs = _outputs(open_session(small_cnn(), "the float model"), feeds)
    for got, want in zip(probe.run(feeds), float_outputs, strict=True):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert len(probe.batched(feeds)) == 1


@pytest.mark.parametrize("measure", list(damage.DamageMeasure))
def test_damage_measures_are_zero_on_identical_outputs_and_positive_otherwise(measure):
    rng = np.random.default_rng(0)
    reference = [[rng.normal(size=(4, 10)).astype(np.float32)] for _ in range(3)]
    moved = [[feed[0] + rng.normal(0, 0.5, feed[0].shape).astype(np.float32)] for feed in reference]
    assert damage.output_damage(measure, reference, reference) == pytest.approx(0.0, abs=1e-12)
    assert damage.output_damage(measure, reference, moved) > 0
    assert damage.output_damage(measure.value, reference, moved) == \
        damage.output_damage(measure, reference, moved)
    assert damage.DAMAGE_MEASURES[measure.value] is damage.damage_function(measure)


def test_similarities():
    rows = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]])
    assert damage.cosine(rows, rows) == pytest.approx(1.0)
    assert damage.cosine(rows, -rows) == pytest.approx(-1.0)
    assert damage.top1_matches(rows, rows[:, ::-1]) == [True, False]
    with pytest.raises(KeyError, match="unknown damage measure"):
        damage.damage_function("cosine")


def test_in_process_executor_maps_in_order():
    executor: Executor = InProcessExecutor()
    assert executor.map(lambda x: x * x, range(6)) == [0, 1, 4, 9, 16, 25]
    assert executor.map(str, []) == []


def test_integer_kernels_are_real_ort_ops(quantized):
    assert "NhwcQLinearConv" not in INTEGER_KERNELS
    schemas = ort.capi.onnxruntime_pybind11_state.get_all_operator_schema()
    registered = {schema.name for schema in schemas}
    assert INTEGER_KERNELS <= registered, sorted(INTEGER_KERNELS - registered)
    assert optimized_op_counts(quantized).get("QLinearConv", 0) >= 1


def test_damage_of_feature_maps_of_varying_width_pools_channel_vectors():
    from onnxq.scoring.damage import output_damage

    rng = np.random.default_rng(0)
    reference = [[rng.normal(size=(1, 4, 3, width))] for width in (5, 7)]
    quantized = [[feed[0] + 0.01 * rng.normal(size=feed[0].shape)] for feed in reference]
    mse = output_damage("mse", reference, quantized)
    energy = sum(float(np.sum(f[0] ** 2)) for f in reference)
    noise = sum(float(np.sum((q[0] - f[0]) ** 2)) for f, q in zip(reference, quantized, strict=True))
    assert mse == pytest.approx(noise / energy, rel=1e-9)
    assert output_damage("kl", reference, reference) == pytest.approx(0.0, abs=1e-12)
