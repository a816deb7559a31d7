"""Latency of models through ONNX Runtime, timed side by side so that a shared machine's drift
reaches every model alike.

    alternating_p50_ms(sessions, feed, timing)     p50 per session, rounds interleaved
    latency_ratios(float_model, candidates, feed)  each candidate's p50 over the float model's
    node_times_ms(model, feed, timing)             ORT's profile: ms per run of each node it ran

`onnxq bench` and `onnxq check` time files; the quantize pipeline (`activations = auto`, the
written model's summary line) times in-memory models. Both go through `alternating_p50_ms`: one
timing loop, one way of reporting a model ORT cannot run. Sessions are made with all graph
optimizations (ORT fuses Q/DQ pairs into integer kernels only then), `threads` intra-op threads
and sequential execution: the deployment's settings, not the calibration sessions' (which use
every core and may turn optimizations down).

A latency is a measurement of this machine at this moment: a choice made from one is only as
stable as the gap between the candidates, so callers compare ratios with a slack.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from onnxq.errors import ConfigError, OnnxqError
from onnxq.scoring import sessions

Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Timing:
    """How latency is timed: `rounds` interleaved rounds of `runs` timed runs per model, after
    `warmup` untimed runs per model, on `threads` intra-op threads. A model so fast that its
    runs would take less than `min_round_ms` per round gets as many more as fill it (a 0.2 ms
    model's ten runs are 2 ms: a scheduler tick moves their median; `alternating_p50_ms`)."""

    rounds: int = 7
    runs: int = 10
    warmup: int = 3
    threads: int = 1
    provider: str = "cpu"
    min_round_ms: float = 25.0

    def __post_init__(self) -> None:
        for name in ("rounds", "runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"latency {name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"latency warmup must be 0 or more, got {self.warmup}")
        if not self.min_round_ms >= 0:
            raise ConfigError(f"latency min_round_ms must be 0 or more, got {self.min_round_ms}")

    @classmethod
    def for_config(cls, config: object) -> Timing:
        """The deployment's timing of a `QuantConfig`: `latency_threads`, its provider."""
        return cls(threads=config.latency_threads, provider=config.provider)

    def session_settings(self, profile_prefix: str | None = None) -> sessions.SessionSettings:
        """All optimizations, sequential execution, ORT's log quiet (failures are exceptions)."""
        return sessions.SessionSettings(threads=self.threads, provider=self.provider,
                                        optimization=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        inter_op_threads=1, log_severity=4,
                                        profile_prefix=profile_prefix)


def timed_runs(session: ort.InferenceSession, feed: Feed, runs: int, warmup: int,
               label: str) -> np.ndarray:
    """Seconds per run of `runs` runs after `warmup` untimed ones; a failure is one line."""
    times = np.empty(runs)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    try:
        for _ in range(warmup):
            session.run(None, feed, quiet)
        for index in range(runs):
            start = time.perf_counter()
            session.run(None, feed, quiet)
            times[index] = time.perf_counter() - start
    except Exception as error:  # ORT raises its own exception types per failure kind
        shapes = ", ".join(f"{name} {list(array.shape)}" for name, array in feed.items())
        raise OnnxqError(f"ONNX Runtime failed to run {label} on the feed ({shapes}): "
                         f"{sessions.tidy_line(error)}; give other shapes or a data file") from None
    return times


def alternating_p50_ms(opened: Sequence[ort.InferenceSession], feed: Feed, timing: Timing,
                       labels: Sequence[str] | None = None) -> list[float]:
    """p50 latency (ms) of each session over `timing.rounds` rounds that take the sessions in
    turn (the warm-up runs once, in the first round). From the second round on, a session runs
    enough times to fill `timing.min_round_ms` (at least `timing.runs`), judged by its first
    round's median."""
    labels = labels or [f"model {index}" for index in range(len(opened))]
    times: list[list[np.ndarray]] = [[] for _ in opened]
    runs = [timing.runs] * len(opened)
    for round_index in range(timing.rounds):
        warmup = timing.warmup if round_index == 0 else 0
        for index, session in enumerate(opened):
            times[index].append(timed_runs(session, feed, runs[index], warmup, labels[index]))
        if round_index == 0:
            runs = [runs_filling(timing, float(np.median(first[0]))) for first in times]
    return [float(np.median(np.concatenate(t))) * 1e3 for t in times]


def runs_filling(timing: Timing, seconds_per_run: float) -> int:
    """Runs per round: `timing.runs`, or as many as take `timing.min_round_ms`."""
    wanted = timing.min_round_ms / 1e3 / max(seconds_per_run, 1e-7)
    return max(timing.runs, min(int(np.ceil(wanted)), 100 * timing.runs))


@dataclass(frozen=True)
class LatencyRatios:
    """p50 (ms) of the float model and of each candidate, and each candidate's ratio to it."""

    float_ms: float
    ms: dict[str, float]
    timing: Timing

    @property
    def ratios(self) -> dict[str, float]:
        return {name: value / self.float_ms for name, value in self.ms.items()}


def latency_ratios(float_model: sessions.Model, candidates: Mapping[str, sessions.Model], feed: Feed,
                   timing: Timing, open_session: Callable | None = None) -> LatencyRatios:
    """Time the float model and every candidate in the same interleaved rounds."""
    settings = timing.session_settings()
    opener = open_session or sessions.open_session
    names = ["float", *candidates]
    models = [float_model, *candidates.values()]
    labels = ["the float model", *(f"the {name} candidate" for name in candidates)]
    opened = [opener(model, label, settings) for model, label in zip(models, labels, strict=True)]
    p50 = alternating_p50_ms(opened, feed, timing, labels)
    return LatencyRatios(p50[0], dict(zip(names[1:], p50[1:], strict=True)), timing)


@dataclass(frozen=True)
class NodeTime:
    """One node of the graph ORT ran: its op type and its mean time per run (ms)."""

    node: str
    op_type: str
    ms: float


# ORT names a node its Q/DQ fusion made after the node it replaced, plus "_token_<n>".
_FUSED_SUFFIX = re.compile(r"_token_\d+$")


def node_times_ms(model: sessions.Model, feed: Feed, timing: Timing, label: str) -> list[NodeTime]:
    """Median time per run of each node ORT ran (its profile of `timing.runs` runs after the
    warm-up; a median, so that a run the machine interrupted does not move it), slowest first;
    a fused node is named after the node it replaced."""
    with tempfile.TemporaryDirectory(prefix="onnxq-profile-") as folder:
        settings = timing.session_settings(profile_prefix=f"{folder}/profile")
        session = sessions.open_session(model, label, settings)
        timed_runs(session, feed, timing.runs, timing.warmup, label)
        with open(session.end_profiling(), encoding="utf-8") as file:
            events = json.load(file)
    durations: dict[str, list[float]] = defaultdict(list)
    op_types: dict[str, str] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = _FUSED_SUFFIX.sub("", name[: -len("_kernel_time")])
        durations[node].append(event["dur"] / 1e3)
        op_types[node] = event.get("args", {}).get("op_name", "?")
    # Events come in run order, one per node and run (two nodes fused from one are summed).
    runs = timing.runs + timing.warmup
    times = []
    for node, values in durations.items():
        per_run = np.asarray(values).reshape(runs, -1).sum(axis=1) if len(values) % runs == 0 \
            else np.asarray(values)
        times.append(NodeTime(node, op_types[node], float(np.median(per_run[-timing.runs:]))))
    return sorted(times, key=lambda item: (-item.ms, item.node))
