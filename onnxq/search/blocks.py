"""Blocks of any graph: the activation groups split where one tensor carries everything on.

Walking the prepared graph in topological order, a *cut* is a tensor after which it is the only
computed value still needed (graph inputs and constants aside): the output of a residual
block or of a transformer layer, a CNN stage boundary. Found from the graph alone, never from
names:

    x -> [conv -> relu -> conv -> add(x)] -> t1 -> [conv -> ... -> add(t1)] -> t2 -> ...
                                             cut                             cut

A block is the activation groups produced from one cut to the next (a group belongs where its
tensor is produced; the group of a cut tensor itself starts the block after the cut, since its
Q/DQ pair sits after it), and the weights of the layers computed there when weights are searched
too (a weight belongs where its layer runs). Blocks with fewer than `min_groups` searched scales
are merged forward, then neighbours are merged until at most `max_blocks` remain. A block's
*input* is its cut tensor (None for the first block: the graph inputs); a candidate runs from
there, its block and everything after it (global loss), or to the next cut (local loss).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx_ir as ir

from onnxq.plan import QuantPlan


@dataclass(frozen=True)
class Block:
    """Activation groups (by stats tensor) searched together; `input` the cut tensor the block
    starts from (None: the graph inputs), `output` the cut it ends at (None: the outputs)."""

    groups: tuple[str, ...]
    input: str | None
    output: str | None


def cut_positions(graph: ir.Graph, activations: frozenset[str] = frozenset()) -> dict[str, int]:
    """Cut tensors -> position of their producer in topological order.

    Values on the side of the main path do not count as live: integer tensors (shapes,
    indices) and values computed from graph inputs and constants without passing through an
    activation in `activations` (an attention mask made once and read by every layer). A
    candidate's run recomputes them from the graph inputs, which it is fed as well."""
    nodes = list(graph)
    position = {id(node): i for i, node in enumerate(nodes)}
    graph_outputs = {id(v) for v in graph.outputs}
    side = {id(v) for v in graph.inputs if v.name not in activations}
    last_use: dict[int, tuple[int, ir.Value]] = {}  # main-path values still needed
    cuts: dict[str, int] = {}
    for i, node in enumerate(nodes):
        from_side = all(v is None or v.const_value is not None or id(v) in side for v in node.inputs)
        for value in node.outputs:
            if (from_side and value.name not in activations) or _is_integer(value):
                side.add(id(value))
                continue
            uses = [position[id(use.node)] for use in value.uses() if id(use.node) in position]
            if uses:
                last_use[id(value)] = (max(uses), value)
        last_use = {key: entry for key, entry in last_use.items() if entry[0] > i}
        if len(last_use) == 1:
            ((_, value),) = last_use.values()
            if value.producer() is node and id(value) not in graph_outputs and value.name:
                cuts[value.name] = i
    return cuts


def _is_integer(value: ir.Value) -> bool:
    return value.dtype is not None and not value.dtype.is_floating_point()


def partition(model: ir.Model, plan: QuantPlan, min_groups: int, max_blocks: int,
              layers: Mapping[str, str] | None = None) -> list[Block]:
    """The plan's activation groups in blocks between cuts, in topological order; `layers`
    (key -> node name) adds other searched scales by where their node runs (weights)."""
    produced_at = {value.name: i for i, node in enumerate(model.graph) for value in node.outputs}
    node_at = {node.name: i for i, node in enumerate(model.graph)}
    activations = frozenset(tensor for group in plan.activation_groups for tensor in group.tensors)
    cuts = sorted((position, name) for name, position in cut_positions(model.graph, activations).items())
    starts = [(-1, None), *cuts]  # (position, input tensor) of each segment
    segments: list[list[str]] = [[] for _ in starts]
    placed = [(produced_at.get(group.tensors[0], -1), group.stats_tensor) for group in plan.activation_groups]
    # a layer producing a cut tensor runs before the cut: its weight belongs to the block before
    placed += [(node_at.get(node, 0) - 0.5, key) for key, node in (layers or {}).items()]
    for position, key in placed:
        segment = max(i for i, (start, _) in enumerate(starts) if start <= position)
        segments[segment].append(key)
    merged: list[tuple[str | None, list[str]]] = []
    pending_input, pending = starts[0][1], []
    for (_, tensor), groups in zip(starts, segments, strict=True):
        if not pending:
            pending_input = tensor
        pending = pending + groups
        if len(pending) >= min_groups:
            merged.append((pending_input, pending))
            pending = []
    if pending:
        if merged:
            merged[-1] = (merged[-1][0], merged[-1][1] + pending)
        else:
            merged.append((pending_input, pending))
    while len(merged) > max_blocks:
        sizes = [len(a[1]) + len(b[1]) for a, b in zip(merged, merged[1:], strict=False)]
        i = sizes.index(min(sizes))
        merged[i:i + 2] = [(merged[i][0], merged[i][1] + merged[i + 1][1])]
    outputs = [tensor for tensor, _ in merged[1:]] + [None]
    return [Block(tuple(groups), tensor, output)
            for (tensor, groups), output in zip(merged, outputs, strict=True)]
