"""Where scoring work runs: an `Executor` or a `WorkerPool` maps a function over items and
returns the results in the items' order.

    InProcessExecutor().map(score, candidates) == [score(c) for c in candidates]

    with open_pool("local", workers, init_session_worker, (job,)) as pool:
        outputs = pool.map(run_session_worker, candidates)    # == in-process, in order

Why pools have an initializer: ONNX Runtime (ORT) sessions cannot be pickled, and the state a
block's scoring needs (the session, the cached block inputs) is large next to one candidate
(a few small scale arrays). So each worker process receives the picklable recipe once, when it
starts (`initializer(*initargs)`: the model bytes, `SessionSettings`' values, the feeds), builds
its session there, keeps it in a module global of the initializer's own module, and then scores
any number of candidates sent through `map`.

A pool that outlives one job (a search opens one pool and scores block after block) ships each
job once with `share`: the value goes to a file in the pool's own temporary folder (local
processes), Ray's object store (Ray) or nowhere (in-process), and the `Shared` handle, small
enough to send with every item, is turned back into the value in the worker by `resolve`,
which keeps the latest value it resolved:

    with open_pool("local", workers) as pool:              # no initializer: workers start bare
        for job in jobs:
            handle = pool.share(job)                       # written once
            scores = pool.map(score, [(handle, c) for c in candidates])
    # score((handle, c)) calls resolve(handle): loaded on a worker's first item of each job

The pattern for an initializer of your own (it must be a module-level function of an importable
module: spawned and Ray workers import it by name; so must `fn`):

    # onnxq/search/worker.py
    _STATE: dict = {}

    def init_block(job: SessionJob, reference: list[np.ndarray]) -> None:
        init_session_worker(job)               # the session, built in this worker
        _STATE["reference"] = reference        # whatever else the block needs

    def score(scales: dict[str, np.ndarray]) -> float:
        return loss(run_session_worker(scales), _STATE["reference"])

Kinds (`ExecutorKind`):

- "local", 1 worker: in this process; `initializer(*initargs)` runs here, `map` is
  `list(map(fn, items))`.
- "local", n > 1 workers: a `concurrent.futures.ProcessPoolExecutor` with the "spawn" start
  method (no fork of a process that holds ORT's thread pools); `map` sends each worker one
  contiguous chunk of ceil(len(items) / n) items; closing it does not wait for the workers to
  exit (that takes a second or more each once onnxq is imported). A program that opens such a pool from its
  main script needs the `if __name__ == "__main__":` guard (spawn re-imports the script).
- "ray": a `ray.util.multiprocessing.Pool` of n actors; joins the cluster at `RAY_ADDRESS`
  when that is set, else starts a local Ray instance with n CPUs (kept for the rest of the
  process: starting Ray costs seconds). Ray is the
  optional extra `pip install 'onnxq[ray]'`; cluster nodes need onnxq installed too.

An initializer that fails in a worker (e.g. a `ModelError` when ORT cannot load the model) is
raised by the pool's first `map`, as itself, rather than as a broken pool or dead actor.

Threads: n workers each running ORT with one thread per core oversubscribe the machine; build
each worker's session with `intra_op_num_threads = threads_per_worker(n)` (cores // n, at least
1), e.g. `SessionJob(..., threads=threads_per_worker(n))`.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import multiprocessing
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

import numpy as np

from onnxq.errors import ConfigError
from onnxq.scoring.sessions import SessionSettings, open_session, run

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

RAY_MISSING = "--executor ray needs Ray: pip install 'onnxq[ray]'"


class Executor(Protocol):
    """Maps a function over items; results in the items' order."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]: ...


class InProcessExecutor:
    """Every item in this process, in order (plain `list(map(fn, items))`)."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return list(map(fn, items))


class ExecutorKind(enum.Enum):
    """Where a pool's workers run: "local" (this process or local processes) or "ray"."""

    LOCAL = "local"
    RAY = "ray"

    @classmethod
    def parse(cls, kind: ExecutorKind | str) -> ExecutorKind:
        if isinstance(kind, cls):
            return kind
        try:
            return cls(kind)
        except ValueError:
            raise ConfigError(f"unknown executor {kind!r}; choose one of "
                              f"{', '.join(k.value for k in cls)}") from None


class WorkerPool(Protocol):
    """Workers set up once by an initializer; `map` keeps the items' order. A context manager:
    leaving it stops the workers (`close`)."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]: ...

    def share(self, value: Any) -> Shared: ...

    def close(self) -> None: ...

    def __enter__(self) -> WorkerPool: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None: ...


def threads_per_worker(workers: int) -> int:
    """ORT intra-op threads for each of `workers` workers on this machine: the cores this
    process may use (its CPU affinity) divided among them, at least 1."""
    _check_workers(workers)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(1, cores // workers)


def open_pool(kind: ExecutorKind | str, workers: int, initializer: Callable[..., None] | None = None,
              initargs: tuple = ()) -> WorkerPool:
    """A pool of `workers` workers of `kind` ("local" or "ray"), each set up by
    `initializer(*initargs)` when one is given (see the module docstring for the pattern and
    the kinds)."""
    kind = ExecutorKind.parse(kind)
    initializer = initializer or _no_setup
    _check_workers(workers)
    if kind is ExecutorKind.RAY:
        return _RayPool(workers, initializer, initargs)
    if workers == 1:
        return _InProcessPool(initializer, initargs)
    return _ProcessPool(workers, initializer, initargs)


def _check_workers(workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a whole number of 1 or more, got {workers!r}")


def _no_setup() -> None:
    pass


@dataclass(frozen=True)
class Shared:
    """A value shipped to a pool's workers once (`WorkerPool.share`), by `key`: the value itself
    (in-process), the file holding it (local processes) or its Ray object reference."""

    key: str
    value: Any = None
    path: str | None = None
    ray_ref: Any = None

    @classmethod
    def inline(cls, value: Any) -> Shared:
        """The value handed over as it is (this process)."""
        return cls(uuid.uuid4().hex, value=value)


_RESOLVED: dict[str, Any] = {}


def resolve(handle: Shared) -> Any:
    """The value behind `handle`, loaded once per worker (the latest one is kept)."""
    if handle.path is None and handle.ray_ref is None:
        return handle.value
    if handle.key not in _RESOLVED:
        if handle.path is not None:
            with open(handle.path, "rb") as stream:
                value = pickle.load(stream)
        else:
            import ray

            value = ray.get(handle.ray_ref)
        _RESOLVED.clear()
        _RESOLVED[handle.key] = value
    return _RESOLVED[handle.key]


class _PoolBase:
    def share(self, value: Any) -> Shared:
        return Shared.inline(value)

    def close(self) -> None:  # pragma: no cover - every pool overrides it
        raise NotImplementedError

    def __enter__(self) -> _PoolBase:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class _InProcessPool(_PoolBase):
    """One worker: this process."""

    def __init__(self, initializer: Callable[..., None], initargs: tuple) -> None:
        initializer(*initargs)
        logger.debug("in-process pool set up")

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return list(map(fn, items))

    def close(self) -> None:
        pass


class _ProcessPool(_PoolBase):
    """`workers` spawned processes; each map item goes in one contiguous chunk per worker."""

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(max_workers=workers,
                                         mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_guarded_init,
                                         initargs=(initializer, tuple(initargs)))
        self._folder = tempfile.mkdtemp(prefix="onnxq-pool-")
        logger.debug("local pool of %d spawned processes", workers)

    def share(self, value: Any) -> Shared:
        key = uuid.uuid4().hex
        path = os.path.join(self._folder, f"{key}.pickle")
        with open(path, "wb") as stream:
            pickle.dump(value, stream, protocol=pickle.HIGHEST_PROTOCOL)
        return Shared(key, path=path)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        items = list(items)
        if not items:
            return []
        chunksize = math.ceil(len(items) / self.workers)
        return list(self._pool.map(functools.partial(_guarded_call, fn), items,
                                   chunksize=chunksize))

    def close(self) -> None:
        # Not waiting: a worker that imported onnxq takes a second or more to exit; the
        # processes are joined in the background (and at exit). Nothing runs now, so the
        # shared files can go.
        self._pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._folder, ignore_errors=True)


class _RayPool(_PoolBase):
    """`workers` Ray actors (`ray.util.multiprocessing.Pool`)."""

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple) -> None:
        try:
            import ray
            from ray.util.multiprocessing import Pool
        except ImportError:  # also when sys.modules["ray"] is None
            raise ConfigError(RAY_MISSING) from None
        address = os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized():
            try:
                if address and address != "local":
                    ray.init(address=address)
                else:
                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                where = f"join the Ray cluster at RAY_ADDRESS={address}" if address else \
                    "start a local Ray instance"
                raise ConfigError(f"cannot {where}: {_one_line(error)}") from None
        self.workers = workers
        try:
            self._pool = Pool(processes=workers, initializer=_guarded_init,
                              initargs=(initializer, tuple(initargs)))
        except ValueError as error:  # more workers than the cluster has CPUs
            raise ConfigError(f"--executor ray: {_one_line(error)}") from None
        logger.debug("Ray pool of %d actors", workers)

    def share(self, value: Any) -> Shared:
        import ray

        return Shared(uuid.uuid4().hex, ray_ref=ray.put(value))

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        items = list(items)
        if not items:
            return []
        chunksize = math.ceil(len(items) / self.workers)
        return self._pool.map(functools.partial(_guarded_call, fn), items, chunksize=chunksize)

    def close(self) -> None:
        self._pool.close()  # the actors finish what they run, then stop
        self._pool.join()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._pool.terminate()  # stops the actors at once


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


# Worker side. An exception from an initializer would otherwise break a process pool
# (BrokenProcessPool) or kill a Ray actor, hiding what went wrong; it is kept here and raised,
# as itself, by the first item the worker runs.
_INIT_FAILURE: list[BaseException] = []


def _guarded_init(initializer: Callable[..., None], initargs: tuple) -> None:
    _INIT_FAILURE.clear()
    try:
        initializer(*initargs)
    except Exception as error:  # raised again, as itself, by _guarded_call
        _INIT_FAILURE.append(error)


def _guarded_call(fn: Callable[[T], R], item: T) -> R:
    if _INIT_FAILURE:
        raise _INIT_FAILURE[0]
    return fn(item)


@dataclass(frozen=True, eq=False)
class SessionJob:
    """What a session worker needs, shipped once per worker: the model as bytes, the feeds it
    is run on (e.g. a block's cached inputs), the outputs to fetch (None: all), and the ORT
    session settings (`threads`: intra-op threads, see `threads_per_worker`; `provider`: "cpu"
    or "cuda"). `label` names the model in errors."""

    model: bytes
    feeds: Sequence[Mapping[str, np.ndarray]]
    output_names: Sequence[str] | None = None
    threads: int = 0
    provider: str = "cpu"
    label: str = "the scoring model"

    def __post_init__(self) -> None:
        if not isinstance(self.model, bytes) or not self.model:
            raise TypeError(f"SessionJob.model is a serialized model (non-empty bytes), "
                            f"not {type(self.model).__name__}")
        object.__setattr__(self, "feeds", tuple(dict(feed) for feed in self.feeds))
        if self.output_names is not None:
            object.__setattr__(self, "output_names", tuple(self.output_names))
        self.settings()  # threads and provider checked here, before any worker starts

    def settings(self) -> SessionSettings:
        return SessionSettings(threads=self.threads, provider=self.provider)


_WORKER: dict[str, Any] = {}


def init_session_worker(job: SessionJob) -> None:
    """Initializer: builds the job's session in this worker and keeps it, with the feeds, for
    `run_session_worker` (one job per process; a later call replaces it)."""
    _WORKER.clear()
    session = open_session(job.model, job.label, job.settings())
    _WORKER.update(job=job, session=session)
    logger.debug("session worker ready: %s, %d feeds, %d threads", job.label, len(job.feeds),
                 job.threads)


def run_session_worker(overrides: Mapping[str, np.ndarray]) -> list[list[np.ndarray]]:
    """The job's outputs for every feed (in order), each feed with `overrides` (inputs by name,
    e.g. a candidate's scales) merged over it."""
    if not _WORKER:
        raise RuntimeError("run_session_worker before init_session_worker in this process")
    job: SessionJob = _WORKER["job"]
    session = _WORKER["session"]
    names = None if job.output_names is None else list(job.output_names)
    return [run(session, names, {**feed, **overrides}, job.label) for feed in job.feeds]
