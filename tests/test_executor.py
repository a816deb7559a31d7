"""onnxq.scoring.executor: worker pools ("local" in process, "local" spawned processes, "ray")
give the in-process results, in order, for a session worker that runs a real ORT session built
once per worker from model bytes; bad kinds and worker counts are one-line ConfigErrors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphs import small_cnn, small_cnn_feeds
from onnxq.errors import ConfigError, ModelError
from onnxq.scoring import executor
from onnxq.scoring.executor import (
    RAY_MISSING,
    Executor,
    ExecutorKind,
    InProcessExecutor,
    SessionJob,
    init_session_worker,
    open_pool,
    run_session_worker,
    threads_per_worker,
)
from onnxq.scoring.sessions import open_session


def _bias_as_input(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The model with the initializer `name` turned into a graph input (a candidate to score)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    tensor = next(t for t in model.graph.initializer if t.name == name)
    model.graph.initializer.remove(tensor)
    model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(tensor.dims)))
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def job() -> SessionJob:
    model = _bias_as_input(small_cnn(), "fc_b")
    return SessionJob(model=model.SerializeToString(), feeds=small_cnn_feeds(5), threads=1,
                      label="small_cnn")


@pytest.fixture(scope="module")
def candidates() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"fc_b": rng.normal(0, 0.1, 10).astype(np.float32)} for _ in range(7)]


@pytest.fixture(scope="module")
def expected(job, candidates) -> list[list[list[np.ndarray]]]:
    session = open_session(job.model, "reference")
    return [[session.run(None, {**feed, **c}) for feed in job.feeds] for c in candidates]


def _assert_identical(got, want) -> None:
    assert len(got) == len(want)
    for per_candidate, want_candidate in zip(got, want, strict=True):
        for outputs, want_outputs in zip(per_candidate, want_candidate, strict=True):
            for a, b in zip(outputs, want_outputs, strict=True):
                np.testing.assert_array_equal(a, b)


def test_in_process_pool_runs_the_initializer_here(job, candidates, expected):
    with open_pool("local", 1, init_session_worker, (job,)) as pool:
        got = pool.map(run_session_worker, candidates)
        assert pool.map(run_session_worker, []) == []
    _assert_identical(got, expected)
    assert len(got) == 7 and len(got[0]) == 5 and got[0][0][0].shape == (1, 10)
    assert not np.array_equal(got[0][0][0], got[1][0][0])  # the candidate reaches the outputs


def test_two_local_processes_give_the_in_process_results_in_order(job, candidates, expected):
    with open_pool(ExecutorKind.LOCAL, 1, init_session_worker, (job,)) as pool:
        in_process = pool.map(run_session_worker, candidates)
    with open_pool("local", 2, init_session_worker, (job,)) as pool:
        spawned = pool.map(run_session_worker, candidates)
        again = pool.map(run_session_worker, reversed(candidates))  # state kept across maps
        assert pool.map(run_session_worker, []) == []
    _assert_identical(spawned, in_process)
    _assert_identical(spawned, expected)
    _assert_identical(again, expected[::-1])


def test_a_shared_value_reaches_every_worker_once_per_job():
    first, second = {"a": np.arange(5)}, {"a": np.arange(3) * 2.0}
    with open_pool("local", 2) as pool:  # no initializer
        handles = [pool.share(first), pool.share(second)]
        folder = pool._folder
        got = pool.map(executor.resolve, [handles[0]] * 4 + [handles[1]] * 4)
        assert len(list(Path(folder).iterdir())) == 2
    for value, expected_value in zip(got, [first] * 4 + [second] * 4, strict=True):
        np.testing.assert_array_equal(value["a"], expected_value["a"])
    assert not Path(folder).exists()  # the shared files go with the pool
    with open_pool("local", 1) as pool:  # in process: the value itself, no copy
        assert executor.resolve(pool.share(first)) is first


def test_a_pool_is_an_executor(job, candidates, expected):
    with open_pool("local", 1, init_session_worker, (job,)) as pool:
        as_executor: Executor = pool
        _assert_identical(as_executor.map(run_session_worker, candidates[:2]), expected[:2])
    assert InProcessExecutor().map(abs, [-1, 2, -3]) == [1, 2, 3]


def test_a_failing_initializer_is_raised_as_itself():
    bad = SessionJob(model=b"not an onnx model", feeds=[], label="broken.onnx")
    with pytest.raises(ModelError, match="cannot load broken.onnx"):
        open_pool("local", 1, init_session_worker, (bad,))
    with open_pool("local", 2, init_session_worker, (bad,)) as pool:  # one item: one process
        with pytest.raises(ModelError, match="cannot load broken.onnx"):
            pool.map(run_session_worker, [{}])


def test_a_bad_candidate_is_a_model_error(job):
    with open_pool("local", 1, init_session_worker, (job,)) as pool:
        with pytest.raises(ModelError, match="cannot run small_cnn"):
            pool.map(run_session_worker, [{"fc_b": np.zeros(3, np.float32)}])


@pytest.mark.parametrize("workers", [0, -2, 1.5, True])
def test_bad_worker_counts_are_config_errors(workers):
    with pytest.raises(ConfigError, match="workers must be a whole number of 1 or more"):
        open_pool("local", workers, init_session_worker, ())
    with pytest.raises(ConfigError, match="workers must be"):
        threads_per_worker(workers)


def test_an_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown executor 'nope'; choose one of local, ray") as info:
        open_pool("nope", 2, init_session_worker, ())
    assert "\n" not in str(info.value)


def test_ray_without_ray_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError) as info:
        open_pool("ray", 2, init_session_worker, ())
    assert str(info.value) == RAY_MISSING == "--executor ray needs Ray: pip install 'onnxq[ray]'"


def test_threads_per_worker_shares_the_cores():
    cores = threads_per_worker(1)
    assert cores >= 1
    assert threads_per_worker(2) == max(1, cores // 2)
    assert threads_per_worker(10_000) == 1


def test_session_job_checks_its_settings_and_model():
    with pytest.raises(ConfigError, match="unknown provider"):
        SessionJob(model=b"x", feeds=[], provider="tpu")
    with pytest.raises(ConfigError, match="threads must be 0"):
        SessionJob(model=b"x", feeds=[], threads=-1)
    with pytest.raises(TypeError, match="non-empty bytes"):
        SessionJob(model=small_cnn(), feeds=[])  # type: ignore[arg-type]
    job = SessionJob(model=b"x", feeds=[{"x": np.zeros(1)}], output_names=["y"])
    assert isinstance(job.feeds, tuple) and job.output_names == ("y",)


def test_run_session_worker_needs_its_initializer(monkeypatch):
    monkeypatch.setattr(executor, "_WORKER", {})
    with pytest.raises(RuntimeError, match="before init_session_worker"):
        run_session_worker({})


def test_output_names_select_outputs():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("s", "p")]
    graph = helper.make_graph([helper.make_node("Add", ["x", "b"], ["s"]),
                               helper.make_node("Mul", ["x", "b"], ["p"])], "g", [x, b], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    feeds = [{"x": np.array([1, 2], np.float32), "b": np.array([0, 0], np.float32)}]
    init_session_worker(SessionJob(model=model.SerializeToString(), feeds=feeds, output_names=["p"]))
    [[product]] = run_session_worker({"b": np.array([3, 4], np.float32)})
    np.testing.assert_array_equal(product, [3, 8])


@pytest.fixture
def local_ray(monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = not ray.is_initialized()
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.slow  # starting a local Ray instance takes 20 s or more
def test_ray_pool_gives_the_in_process_results(local_ray, job, candidates, expected):
    with open_pool("ray", 2, init_session_worker, (job,)) as pool:
        got = pool.map(run_session_worker, candidates)
        assert pool.map(run_session_worker, []) == []
        shared = pool.share({"a": np.arange(4)})  # through Ray's object store
        for value in pool.map(executor.resolve, [shared] * 3):
            np.testing.assert_array_equal(value["a"], np.arange(4))
    _assert_identical(got, expected)
    bad = SessionJob(model=b"not an onnx model", feeds=[], label="broken.onnx")
    with open_pool("ray", 2, init_session_worker, (bad,)) as pool:
        with pytest.raises(ModelError, match="cannot load broken.onnx"):
            pool.map(run_session_worker, [{}, {}])
