"""`Scorer`: sessions, cached float outputs, fidelity, and models whose constants are inputs.

    scorer = Scorer(SessionSettings(threads=4))
    reference = scorer.reference(float_model, feeds)       # float outputs, once per feed
    report = scorer.measure_fidelity(quantized, reference, feeds)
    lifted = scorer.probe(model, {("conv1", 1): w})        # conv1's weight is now an input
    outputs = lifted.run(feeds, {lifted.input_name("conv1", 1): w_q})

A `Reference` runs the float model on a feed the first time it is asked for it and replays
the outputs after: verifying a quantized model, every `--max-drop` fidelity check of the bit
allocator and a sensitivity probe's reference all read the same cached outputs. Feeds are
matched by content (input names, dtypes, shapes and bytes, through a BLAKE2 digest), so a
feed read again from disk is the same feed. It quacks like a session (`get_outputs`, `run`)
where a float session was taken. A Reference the Scorer opened on a model can `release` its
session (the float weights: 2 GB and more for a big model) once the outputs needed are cached;
a feed asked for later opens it again.

A `LiftedModel` turns chosen constant inputs of nodes (weights, biases, Q/DQ scales and zero
points) into graph inputs of one ORT session, fed their original values by default: one
session then scores any number of candidate values without serializing the model again.

    W -> Conv          becomes          onnxq_lift0 (graph input, default W) -> Conv

Only the chosen node's input is rewired (another node reading the same initializer keeps
it); constants nothing reads any more are removed (RemoveUnusedNodesPass). An input's dtype
is that of the value it replaces.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxq import model_io
from onnxq.data import Feed
from onnxq.errors import ConfigError
from onnxq.scoring import sessions
from onnxq.scoring.fidelity import FidelityReport, measure_fidelity
from onnxq.scoring.sessions import Model, SessionSettings

logger = logging.getLogger(__name__)

Outputs = list[list[np.ndarray]]  # [feed][output]
# (node name, input index): a constant input of a node.
InputSlot = tuple[str, int]


def feed_key(feed: Mapping[str, np.ndarray]) -> bytes:
    """A digest of a feed's content: input names, dtypes, shapes and values."""
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(feed):
        array = np.asarray(feed[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        if array.dtype.hasobject:
            digest.update(repr(array.tolist()).encode())
        else:
            digest.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)
    return digest.digest()


def batch_feeds(feeds: Sequence[Feed], batch_axis_free: bool) -> list[Feed]:
    """Feeds of one shape joined along the batch axis when the model's first axis is free (one
    run instead of many; the damage measures pool rows, so the result is the same)."""
    shapes = {tuple((name, array.shape) for name, array in sorted(feed.items())) for feed in feeds}
    if not batch_axis_free or len(shapes) != 1 or len(feeds) < 2:
        return list(feeds)
    return [{name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}]


class CheckedSession:
    """A session whose run errors (e.g. a feed the model rejects) are one-line ModelErrors."""

    def __init__(self, session: ort.InferenceSession, label: str) -> None:
        self.session = session
        self.label = label

    def get_outputs(self) -> list:
        return self.session.get_outputs()

    def run(self, names: Sequence[str] | None, feed: Feed) -> list[np.ndarray]:
        return sessions.run(self.session, names, feed, self.label)


@dataclass(frozen=True)
class OutputArg:
    """An output's name, type and shape, as a session's `get_outputs()` lists them (ORT's own
    NodeArgs keep their session alive)."""

    name: str
    type: str
    shape: tuple


class Reference:
    """The float model's outputs, computed once per feed (by content) and replayed; usable in
    place of the float session (`get_outputs`, `run`). `reopen` opens the session again after
    `release`."""

    def __init__(self, session: ort.InferenceSession, label: str = "the float model",
                 reopen: Callable[[], ort.InferenceSession] | None = None) -> None:
        self.session = session
        self.label = label
        self._reopen = reopen
        self._outputs = [OutputArg(o.name, o.type, tuple(o.shape)) for o in session.get_outputs()]
        self.output_names = [o.name for o in self._outputs]
        self._cache: dict[bytes, list[np.ndarray]] = {}

    def get_outputs(self) -> list:
        return self._outputs

    def outputs(self, feed: Feed) -> list[np.ndarray]:
        """Every output of the float model on the feed, in `output_names` order."""
        key = feed_key(feed)
        if key not in self._cache:
            if self.session is None:
                self.session = self._reopen()
            self._cache[key] = sessions.run(self.session, self.output_names, feed, self.label)
        return self._cache[key]

    def release(self) -> None:
        """Close the session when it can be opened again; cached outputs stay."""
        if self._reopen is not None:
            self.session = None

    def run(self, names: Sequence[str] | None, feed: Feed) -> list[np.ndarray]:
        outputs = self.outputs(feed)
        if names is None or list(names) == self.output_names:
            return outputs
        index = {name: i for i, name in enumerate(self.output_names)}
        return [outputs[index[name]] for name in names]

    def __len__(self) -> int:
        """Feeds whose outputs are cached."""
        return len(self._cache)


@dataclass(frozen=True)
class LiftedInput:
    """One constant input of a node turned into a graph input."""

    node: str
    index: int
    name: str  # the graph input
    default: np.ndarray


class LiftedModel:
    """A model with chosen node inputs lifted to graph inputs, in one ORT session."""

    def __init__(self, session: ort.InferenceSession, lifted: Sequence[LiftedInput],
                 output_names: Sequence[str], batch_axis_free: bool, label: str) -> None:
        self.session = session
        self.lifted = tuple(lifted)
        self.output_names = list(output_names)
        self.batch_axis_free = batch_axis_free
        self.label = label
        self.defaults: dict[str, np.ndarray] = {item.name: item.default for item in self.lifted}
        self._slots = {(item.node, item.index): item.name for item in self.lifted}

    def input_name(self, node: str, index: int) -> str:
        """The graph input that feeds `node`'s input `index`."""
        return self._slots[(node, index)]

    def batched(self, feeds: Sequence[Feed]) -> list[Feed]:
        """The feeds joined along the batch axis where the model allows it (`batch_feeds`)."""
        return batch_feeds(feeds, self.batch_axis_free)

    def run(self, feeds: Iterable[Feed], overrides: Mapping[str, np.ndarray] | None = None) -> Outputs:
        """Outputs over the feeds, the lifted inputs at their defaults except `overrides`
        ({lifted input name: values}, cast to the input's dtype)."""
        inputs = dict(self.defaults)
        for name, values in (overrides or {}).items():
            if name not in self.defaults:
                raise ConfigError(f"{name} is not a lifted input of {self.label} (they are "
                                  f"{', '.join(self.defaults)})")
            inputs[name] = np.asarray(values, self.defaults[name].dtype)
        return [sessions.run(self.session, self.output_names, {**feed, **inputs}, self.label)
                for feed in feeds]


class Scorer:
    """Sessions with one set of settings, and what is scored with them."""

    def __init__(self, settings: SessionSettings | None = None) -> None:
        self.settings = settings or SessionSettings()

    def session(self, model: Model, label: str, **kwargs: object) -> ort.InferenceSession:
        """An ORT session (see `onnxq.scoring.sessions.open_session` for the keywords)."""
        return sessions.open_session(model, label, self.settings, **kwargs)

    def reference(self, float_model: Model | ort.InferenceSession | Reference,
                  feeds: Iterable[Feed] = (), label: str = "the float model") -> Reference:
        """The float model's cached outputs; those of `feeds` computed now (any other feed's
        when first asked for). A session (anything with `run` and `get_outputs`) is used as
        it is; a Reference is returned as it is."""
        if isinstance(float_model, Reference):
            reference = float_model
        elif hasattr(float_model, "run") and hasattr(float_model, "get_outputs"):
            reference = Reference(float_model, label)
        else:
            reference = Reference(self.session(float_model, label), label,
                                  reopen=lambda: self.session(float_model, label))
        for feed in feeds:
            reference.outputs(feed)
        return reference

    def measure_fidelity(self, quantized: Model | ort.InferenceSession,
                         reference: Reference | ort.InferenceSession, feeds: Iterable[Feed],
                         held_out: bool = True, label: str = "the quantized model") -> FidelityReport:
        """Every output of the quantized model against the reference's over the feeds; run
        errors are one-line ModelErrors naming `label`."""
        session = quantized if hasattr(quantized, "run") else self.session(quantized, label)
        return measure_fidelity(reference, CheckedSession(session, label), feeds, held_out)

    def probe(self, model: ir.Model, lifted: Mapping[InputSlot, np.ndarray],
              names: Mapping[InputSlot, str] | None = None,
              label: str = "the probe model") -> LiftedModel:
        """A `LiftedModel` of a copy of `model` (left unchanged) in which each (node name,
        input index) of `lifted` reads a new graph input whose default is the given array.

        Inputs are named by `names`, else `onnxq_lift{n}` in the order of `lifted`."""
        probe = model_io.to_ir(model_io.to_proto(model))  # a copy
        nodes = {node.name: node for node in probe.graph}
        items = []
        for number, ((node_name, index), array) in enumerate(lifted.items()):
            node = nodes.get(node_name)
            if node is None:
                raise ConfigError(f"no node named {node_name!r} to lift an input of")
            if not 0 <= index < len(node.inputs) or node.inputs[index] is None:
                raise ConfigError(f"node {node_name} has no input {index} to lift")
            name = (names or {}).get((node_name, index), f"onnxq_lift{number}")
            items.append(_lift(probe.graph, node, index, name, array))
        RemoveUnusedNodesPass()(probe)
        proto = model_io.to_proto(probe)
        lifted_names = {item.name for item in items}
        batch_axis_free = all(
            graph_input.type.tensor_type.shape.dim and
            not graph_input.type.tensor_type.shape.dim[0].HasField("dim_value")
            for graph_input in proto.graph.input if graph_input.name not in lifted_names)
        session = self.session(proto, label)
        return LiftedModel(session, items, [output.name for output in proto.graph.output],
                           batch_axis_free, label)


def _lift(graph: ir.Graph, node: ir.Node, index: int, name: str, array: np.ndarray) -> LiftedInput:
    """Rewire `node`'s input `index` to a new graph input `name` of the replaced value's type."""
    replaced = node.inputs[index]
    data_type = replaced.dtype
    if data_type is None and replaced.const_value is not None:
        data_type = replaced.const_value.dtype
    if data_type is None:
        data_type = ir.DataType.from_numpy(np.asarray(array).dtype)
    array = np.asarray(array, data_type.numpy())
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(data_type))
    graph.inputs.append(value)
    node.replace_input_with(index, value)
    return LiftedInput(node.name, index, name, array)

