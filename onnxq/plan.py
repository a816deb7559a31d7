"""The quantization plan: what to quantize, decided before any node is created.

`annotate` (passes/annotate.py) fills a `QuantPlan` from a prepared model and a config; the
calibration, search and emit stages all read this one object. Tensors are referred to by their
names in the prepared model, as labels only: the emitter finds the values again by name in the
very graph the plan was made from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from onnxq.numerics import IntRange


@dataclass(frozen=True)
class ActivationGroup:
    """Activation tensors that share one scale and zero point.

    A chain such as Conv -> Relu -> MaxPool is one group: ORT then removes the Q/DQ pairs
    between them. `stats_tensor` is the group's last tensor, whose range covers what the
    chain passes on (the Relu's clamp included).
    """

    tensors: tuple[str, ...]
    stats_tensor: str
    grid: IntRange
    symmetric: bool
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class WeightQuant:
    """A constant weight input of a compute node, quantized per channel (or tensor), or per
    group of `group_size` weights along `block_axis`.

    `axis` is the output-channel axis (per-channel scales, bias scales). `block_axis` is the
    reduction axis of the weight's grouped view (`onnxq.numerics.grouped_shape`: a Conv weight
    (O, I, kh, kw) is viewed as (O, I * kh * kw)); None where the op takes no groups. The group
    sizes below 8 bits and at 8 bits (0: per channel) are both kept, since the allocator changes
    bits after planning. `asymmetric`: rows below 8 bits get zero points (COMQ's asymmetric ops).
    """

    tensor: str
    node: str
    input_index: int
    axis: int | None
    grid: IntRange
    block_axis: int | None = None
    low_bit_group_size: int = 0
    int8_group_size: int = 0
    asymmetric: bool = False

    @property
    def group_size(self) -> int:
        """Weights per scale along `block_axis` at this spec's bits (0: per channel / tensor)."""
        if self.block_axis is None or self.axis is None:
            return 0
        return self.low_bit_group_size if self.grid.bits < 8 else self.int8_group_size

    @property
    def symmetric(self) -> bool:
        return not self.asymmetric or self.grid.bits >= 8

    def at_bits(self, bits: int) -> WeightQuant:
        """The same weight quantized at `bits` (same signedness)."""
        return dataclasses.replace(self, grid=self.grid.with_bits(bits))

    def full_range(self) -> WeightQuant:
        """The same weight with full-range 8-bit codes (no `reduce_8bit`): a dynamic layer's,
        which never needs 7-bit codes (onnxq.passes.dynamic_quantize)."""
        return dataclasses.replace(self, grid=IntRange(self.grid.bits, self.grid.signed),
                                   low_bit_group_size=0, int8_group_size=0)


@dataclass(frozen=True)
class BiasQuant:
    """A bias input quantized to int32 with scale s_input * s_weight and zero point 0."""

    tensor: str
    node: str
    input_index: int
    activation: str
    weight: str


@dataclass
class QuantPlan:
    """Everything the later stages need to know about what gets quantized and why not."""

    activation_groups: list[ActivationGroup] = field(default_factory=list)
    weights: list[WeightQuant] = field(default_factory=list)
    biases: list[BiasQuant] = field(default_factory=list)
    quantized_nodes: dict[str, str] = field(default_factory=dict)
    float_nodes: dict[str, str] = field(default_factory=dict)
    float_reasons: dict[str, str] = field(default_factory=dict)
    # Layers whose weight bits a `layer_bits` rule fixed: node name -> the rule's text.
    bits_rules: dict[str, str] = field(default_factory=dict)
    # Layers whose bits a default other than `weight_bits` set (`short_row_bits`): node name ->
    # why. Not fixed: an allocator re-plans them like any other layer.
    bits_defaults: dict[str, str] = field(default_factory=dict)
    # Layers that quantize their input per batch at run time (onnxq.passes.dynamic_quantize):
    # node name -> why (the config, a rule, the auto choice). Their inputs join no group.
    dynamic_layers: dict[str, str] = field(default_factory=dict)
    # Layers whose activation mode a `layer_activations` rule fixed: node name -> the rule's text.
    mode_rules: dict[str, str] = field(default_factory=dict)
    # Static layers whose mode was measured (activations = auto): node name -> why.
    static_reasons: dict[str, str] = field(default_factory=dict)
    # Layers that read their input in float (activations = auto): node name -> why. Their
    # weights stay quantized (weight-only: DequantizeLinear or MatMulNBits in front of the float
    # op, the file no larger), their biases float; the emitter rewires their input to the float
    # tensor in front of its Q -> DQ pair (onnxq.passes.float_activations).
    float_activations: dict[str, str] = field(default_factory=dict)

    def with_weight_bits(self, bits: dict[str, int]) -> QuantPlan:
        """A copy whose weights of the named nodes have the given bits (others unchanged)."""
        weights = [spec.at_bits(bits[spec.node]) if spec.node in bits else spec for spec in self.weights]
        return dataclasses.replace(self, weights=weights)

    def static_part(self) -> QuantPlan:
        """What the Q/DQ emitter writes: the plan without its dynamic layers' weights and biases
        and without the biases of layers with float activations (an int32 bias needs an input
        scale)."""
        weights = [spec for spec in self.weights if spec.node not in self.dynamic_layers]
        biases = [spec for spec in self.biases if spec.node not in self.dynamic_layers
                  and spec.node not in self.float_activations]
        return dataclasses.replace(self, weights=weights, biases=biases, dynamic_layers={})

    def with_dynamic(self, layers: dict[str, str]) -> QuantPlan:
        """A copy in which `layers` (name -> why) are dynamic too, their weights at full range.
        Their input groups stay: the emitter drops a Q/DQ pair no static layer reads any more."""
        weights = [spec.full_range() if spec.node in layers else spec for spec in self.weights]
        return dataclasses.replace(self, weights=weights, dynamic_layers={**self.dynamic_layers, **layers})

    def with_float_activations(self, layers: dict[str, str]) -> QuantPlan:
        """A copy in which `layers` (name -> why) read float inputs, their weights quantized."""
        return dataclasses.replace(self, float_activations={**self.float_activations, **layers})

    def activation_mode(self, node: str) -> str:
        """"dynamic", "static", "float" (quantized weight, float input), or "none" (a
        weight-only layer: an embedding Gather)."""
        if node in self.dynamic_layers:
            return "dynamic"
        if node in self.float_activations:
            return "float"
        return "none" if self.quantized_nodes.get(node) == "Gather" else "static"

    def weight_of(self, node: str) -> WeightQuant | None:
        """The quantized weight of the named layer, if it has one."""
        return next((spec for spec in self.weights if spec.node == node), None)

    def group_of(self, tensor: str) -> ActivationGroup:
        for group in self.activation_groups:
            if tensor in group.tensors:
                return group
        raise KeyError(f"tensor {tensor} is not a quantized activation")

    @property
    def stats_tensors(self) -> list[str]:
        """The tensors whose statistics calibration must collect."""
        return [group.stats_tensor for group in self.activation_groups]
