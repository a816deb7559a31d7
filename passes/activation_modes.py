"""Which layers quantize their input per batch at run time (dynamic) rather than with a
calibrated scale (static). Decided before annotation; changes nothing in the graph.

Precedence, as for weight bits:

    exclude, layer_bits "=float"     the layer stays float (no activation mode)
    layer_activations rules          the last "PATTERN=static|dynamic" rule that matches
    activations                      dynamic: every capable layer; static and auto: none yet
                                     (auto's choice is made later, on measured damage:
                                     onnxq.stages.activation_modes)

Rules match among the capable layers only (`dynamic_capable`: MatMul / Gemm with a constant
2-D float weight, planned at 8 bits: MatMulInteger takes 8-bit operands, and layers below 8
bits keep their own kernels, e.g. MatMulNBits); a rule that matches none of them is an error.
The bit allocator leaves dynamic layers at 8 bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxq.config import ActivationMode, QuantConfig
from onnxq.passes.dynamic_quantize import dynamic_capable
from onnxq.patterns import nodes_matching


@dataclass(frozen=True)
class LayerModes:
    """dynamic: layer name -> why its activations are dynamic; rules: layer name -> the rule
    that fixed its mode (static or dynamic)."""

    dynamic: dict[str, str] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)


def capable_layers(layers: Sequence[ir.Node], excluded: Mapping[str, str]) -> list[ir.Node]:
    """The layers that can take dynamic activations and are not kept float."""
    return [node for node in layers if node.name not in excluded and dynamic_capable(node) is None]


def layer_modes(layers: Sequence[ir.Node], config: QuantConfig, excluded: Mapping[str, str]) -> LayerModes:
    """The dynamic layers among the weight layers `layers`, by the precedence above."""
    capable = capable_layers(layers, excluded)
    modes = LayerModes()
    if config.activations is ActivationMode.DYNAMIC:
        modes.dynamic.update(dict.fromkeys((node.name for node in capable), "activations = dynamic"))
    for rule in config.mode_rules:
        text = f"{rule.pattern}={rule.mode.value}"
        hits = nodes_matching(capable, rule.pattern,
                              f"layer rule {text!r} matches no layer that can take dynamic activations "
                              f"(MatMul or Gemm with a constant 2-D weight of 8 bits, not excluded)")
        for node in hits:
            modes.rules[node.name] = text
            if rule.mode is ActivationMode.DYNAMIC:
                modes.dynamic[node.name] = f"rule {text}"
            else:
                modes.dynamic.pop(node.name, None)
    return modes
