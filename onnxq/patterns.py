"""The one matcher of node selections (`--exclude`, `--layer PATTERN=BITS`, compare's `--layer`).

A pattern matches a node when it equals the node's op type, equals its name, or is an fnmatch
glob over its name ("*attention*"). A selection that matches nothing is an error, reported by
the caller with its own wording (which option, which kind of node).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import onnx_ir as ir

from onnxq.errors import ConfigError


def matches(node: ir.Node, pattern: str) -> bool:
    """True when `pattern` is the node's op type, its name, or a glob over its name."""
    name = node.name or ""
    return node.op_type == pattern or name == pattern or fnmatch.fnmatchcase(name, pattern)


def nodes_matching(nodes: Iterable[ir.Node], pattern: str, nothing: str) -> list[ir.Node]:
    """The nodes `pattern` matches, in order; none is a ConfigError with the message `nothing`."""
    hits = [node for node in nodes if matches(node, pattern)]
    if not hits:
        raise ConfigError(nothing)
    return hits
