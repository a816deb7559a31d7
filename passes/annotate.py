"""Annotate: decide what to quantize and build the `QuantPlan`. Changes nothing in the graph.

One walk in topological order, driven by the op table (passes/op_table.py):

    compute node  -> its activation inputs (and, for Conv-like ops, its output) are quantized;
                     its constant weight per channel, its 1-D bias as int32
    chain node    -> when its input is quantized and feeds it alone, its output joins the
                     input's group (shared scale / zero point)
    join node     -> quantized when all its activation inputs are; then so is its output;
                     also when its output is quantized and only some inputs are (a float
                     island in ORT): the others, read by it alone, are quantized too

Nodes matched by `config.exclude` (node name, op type, or a glob over node names) stay float;
an entry that matches no node is an error. `config.layer_bits` rules ("PATTERN=BITS", the last
matching rule wins) set the weight bits of the layers they match, or keep them float; a rule
that matches no quantizable layer is an error. Other layers get `config.weight_bits` (the
allocator, onnxq.bits.knapsack, later re-plans the ones no rule fixed).

Dynamic layers (passes/activation_modes.py: `activations`, `layer_activations` rules) keep
their weight but put their input in no group: it is quantized per batch at run time, and their
bias stays as the model has it, in float. Without calibration data (`calibrated=False`) every
other layer that would need a static activation scale stays float; embedding tables (weight
only) are quantized.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnxq.config import (
    ActivationMode,
    ActivationType,
    LayerRule,
    PerTensor,
    QuantConfig,
    WeightMethod,
)
from onnxq.numerics import INT8, UINT8, IntRange, grouped_shape
from onnxq.passes.activation_modes import LayerModes, layer_modes
from onnxq.passes.dynamic_quantize import dynamic_capable
from onnxq.passes.op_table import (
    OpKind,
    activation_input_indices,
    reduction_axis,
    rule_for,
    weight_axis,
)
from onnxq.patterns import nodes_matching
from onnxq.plan import ActivationGroup, BiasQuant, QuantPlan, WeightQuant

logger = logging.getLogger(__name__)


def excluded_nodes(graph: ir.Graph, patterns: tuple[str, ...]) -> dict[str, str]:
    """Node name -> the exclude entry that matched it; an entry matching nothing is an error."""
    matched: dict[str, str] = {}
    for pattern in patterns:
        hits = nodes_matching(graph, pattern, f"exclude entry {pattern!r} matches no node name or op type")
        for node in hits:
            matched.setdefault(node.name, pattern)
    return matched


def layer_rule_bits(layers: list[ir.Node], rules: tuple[LayerRule, ...]) -> dict[str, LayerRule]:
    """Layer name -> the last rule that matches it; a rule matching no layer is an error."""
    chosen: dict[str, LayerRule] = {}
    for rule in rules:
        hits = nodes_matching(layers, rule.pattern,
                              f"layer rule {rule.pattern!r} matches no quantizable layer "
                              f"(node name, op type or glob over node names)")
        chosen.update(dict.fromkeys((node.name for node in hits), rule))
    return chosen


def weight_layers(graph: ir.Graph, config: QuantConfig) -> list[ir.Node]:
    """The nodes whose constant weight can be quantized (what per-layer bits apply to)."""
    layers = []
    for node in graph:
        rule = rule_for(node)
        if rule is None or rule.kind is not OpKind.COMPUTE or rule.weight_input is None:
            continue
        if not _is_constant(node.inputs[rule.weight_input]):
            continue
        if node.op_type == "MatMul" and _is_constant(node.inputs[0]):
            continue
        if node.op_type == "Gather" and not _is_embedding(node, config):
            continue
        layers.append(node)
    return layers


def _is_embedding(node: ir.Node, config: QuantConfig) -> bool:
    axis = node.attributes.get("axis")
    table = node.inputs[0].const_value
    return (config.quantize_gather and (axis is None or axis.as_int() == 0)
            and table is not None and len(table.shape) == 2)


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


class _Groups:
    """Union of tensors into shared-parameter chains (each chain has a head and a tail)."""

    def __init__(self) -> None:
        self.tail_of: dict[str, str] = {}
        self.members: dict[str, list[str]] = {}

    def add(self, tensor: str) -> None:
        if tensor not in self.tail_of:
            self.tail_of[tensor] = tensor
            self.members[tensor] = [tensor]

    def extend(self, tensor: str, successor: str) -> None:
        """Join the chain that ends in `tensor` with `successor` (new, or a chain's head)."""
        self.add(successor)
        members = self.members.pop(self.tail_of[tensor]) + self.members.pop(self.tail_of[successor])
        tail = members[-1]
        self.members[tail] = members
        for member in members:
            self.tail_of[member] = tail

    def __contains__(self, tensor: str) -> bool:
        return tensor in self.tail_of


def annotate(model: ir.Model, config: QuantConfig, calibrated: bool = True) -> QuantPlan:
    """Build the plan for a prepared model (nodes named, constants as initializers);
    `calibrated`: whether calibration data will give static activations their scales."""
    graph = model.graph
    excluded = excluded_nodes(graph, config.exclude)
    layers = weight_layers(graph, config)
    layer_rules = layer_rule_bits(layers, config.layer_rules)
    for name, layer_rule in layer_rules.items():
        if layer_rule.bits is None:
            excluded.setdefault(name, f"{layer_rule.pattern}=float")
    eight_bit = [node for node in layers  # dynamic layers run MatMulInteger: 8-bit weights
                 if (layer_rules[node.name].bits if node.name in layer_rules else config.weight_bits) == 8]
    walk = _Walk(config, excluded, layer_rules, layer_modes(eight_bit, config, excluded), calibrated)
    # Compute nodes first: their inputs are quantized whatever comes before them.
    for node in graph:
        rule = rule_for(node)
        if node.name not in excluded and rule is not None and rule.kind is OpKind.COMPUTE:
            walk.compute_node(node, rule)
    # Chains and joins, in topological order, so each sees its producers decided.
    for node in graph:
        if node.name not in walk.plan.quantized_nodes:
            walk.other_node(node, rule_for(node))
    # Joins left between quantized tensors with a float input: quantize that input too; last
    # to first, so that a join whose output just became quantized is seen after.
    for node in reversed(list(graph)) if config.close_float_islands else ():
        if node.name not in walk.plan.quantized_nodes and node.name not in excluded:
            walk.close_island(node, rule_for(node))
    plan = walk.plan
    for reason_node in list(plan.float_reasons):
        if reason_node in plan.quantized_nodes:
            del plan.float_reasons[reason_node]
    _add_activation_groups(graph, plan, walk.groups, config)
    logger.info("plan: %d nodes quantized, %d float, %d activation groups, %d weights",
                len(plan.quantized_nodes), len(plan.float_nodes), len(plan.activation_groups),
                len(plan.weights))
    return plan


class _Walk:
    """The plan and activation groups filled in node by node."""

    def __init__(self, config: QuantConfig, excluded: dict[str, str],
                 layer_rules: dict[str, LayerRule], modes: LayerModes, calibrated: bool) -> None:
        self.config = config
        self.excluded = excluded
        self.layer_rules = layer_rules
        self.dynamic = modes.dynamic
        self.calibrated = calibrated
        self.per_tensor = isinstance(config.weight_granularity, PerTensor)
        self.plan = QuantPlan(mode_rules=dict(modes.rules))
        self.groups = _Groups()

    def _float_reason(self, node: ir.Node, weight: ir.Value | None) -> str | None:
        """Why a compute node stays float, or None when it is quantized."""
        if node.op_type == "Gather":
            return None if _is_embedding(node, self.config) else "no integer kernel"
        if node.op_type == "MatMul":
            if _is_constant(node.inputs[0]):
                return "constant first operand"
            if not _is_constant(weight) and not self.config.quantize_activation_matmul:
                return "activation x activation MatMul (option off)"
            return None
        return None if _is_constant(weight) else "weight is not a constant"

    def compute_node(self, node: ir.Node, rule) -> None:
        """A compute node: its activation inputs, constant weight and bias, maybe its output."""
        plan = self.plan
        weight = node.inputs[rule.weight_input] if rule.weight_input is not None else None
        reason = self._float_reason(node, weight)
        dynamic = node.name in self.dynamic
        if reason is None and not dynamic and not self.calibrated and rule.activation_inputs:
            reason = "static activations need calibration data (none given)"
        if reason is not None:
            plan.float_reasons[node.name] = reason
            return
        plan.quantized_nodes[node.name] = node.op_type
        if dynamic:
            plan.dynamic_layers[node.name] = self.dynamic[node.name]
        elif self.config.activations is ActivationMode.DYNAMIC and (why := dynamic_capable(node)):
            plan.static_reasons[node.name] = f"cannot be dynamic: {why}"
        for index in () if dynamic else rule.activation_inputs:
            value = node.inputs[index]
            if value is not None and not _is_constant(value):
                self.groups.add(value.name)
        if _is_constant(weight):
            self._weight_and_bias(node, rule, weight, with_bias=not dynamic)
        if rule.quantize_output and not dynamic:
            self.groups.add(node.outputs[0].name)

    def _weight_and_bias(self, node: ir.Node, rule, weight: ir.Value, with_bias: bool) -> None:
        plan = self.plan
        axis = None if self.per_tensor else weight_axis(node) % len(weight.const_value.shape)
        # a dynamic layer's MatMulInteger takes per-channel scales only (with_bias is False there)
        block_axis = None if axis is None or not with_bias else reduction_axis(
            node, rule.weight_input, weight.const_value.shape)
        bits = self.config.weight_bits
        if node.name in self.layer_rules:
            bits = self.layer_rules[node.name].bits
            plan.bits_rules[node.name] = f"{self.layer_rules[node.name].pattern}={bits}"
        elif (short := self._short_row_bits(weight, block_axis)) is not None:
            bits, plan.bits_defaults[node.name] = short
        plan.weights.append(WeightQuant(
            weight.name, node.name, rule.weight_input, axis,
            IntRange(bits, True, self._reduce_range(node, weight)), block_axis,
            *self._group_sizes(node, weight, block_axis), asymmetric=self._asymmetric(node)))
        bias = node.inputs[rule.bias_input] if (with_bias and rule.bias_input is not None
                                                 and len(node.inputs) > rule.bias_input) else None
        if _is_constant(bias) and len(bias.const_value.shape) == 1:
            plan.biases.append(BiasQuant(bias.name, node.name, rule.bias_input,
                                         node.inputs[0].name, weight.name))

    def _short_row_bits(self, weight: ir.Value, block_axis: int | None) -> tuple[int, str] | None:
        """`short_row_bits` and why, for a weight planned below them whose rows are no longer
        than one group (a depthwise Conv's 9 or 25 weights, a 1x1 Conv over 16 channels): one
        scale per row is all a group could give it, and its bytes are few. Only for the bits
        `weight_bits` sets: with a budget the allocator measures every layer and decides."""
        config = self.config
        bits, group = config.weight_bits, config.group_size_at(config.weight_bits)
        if (config.allocation_budget is not None or block_axis is None or not group
                or bits >= config.short_row_bits):
            return None
        length = grouped_shape(tuple(weight.const_value.shape))[block_axis]
        if length > group:
            return None
        return config.short_row_bits, (f"short_row_bits: rows of {length} weights, no longer than "
                                       f"one group ({group})")

    def _group_sizes(self, node: ir.Node, weight: ir.Value, block_axis: int | None) -> tuple[int, int]:
        """Group sizes below 8 bits and at 8 bits (0: per channel); per channel too where a
        row is no longer than one group (a depthwise 3x3 Conv's 9 weights), and for Convs
        stored fast (`conv_storage`: QLinearConv takes per-channel scales only)."""
        if block_axis is None or self._fast_conv(node):
            return 0, 0
        length = grouped_shape(tuple(weight.const_value.shape))[block_axis]
        return tuple(size if size and length > size else 0
                     for size in (self.config.group_size_at(4), self.config.group_size_at(8)))

    def _asymmetric(self, node: ir.Node) -> bool:
        """Rows below 8 bits get zero points (COMQ's `asymmetric_ops`); not a Conv stored fast:
        ORT's QLinearConv with weight zero points takes a slow path (EfficientNet-Lite0's
        depthwise Convs: 20-40 ms each against 0.4 ms)."""
        return (self.config.weight_method is WeightMethod.COMQ
                and node.op_type in self.config.comq.asymmetric_ops
                and not self._fast_conv(node))

    def _fast_conv(self, node: ir.Node) -> bool:
        return self.config.conv_storage == "fast" and node.op_type in ("Conv", "ConvTranspose")

    def _reduce_range(self, node: ir.Node, weight: ir.Value) -> bool:
        """7-bit codes for this 8-bit weight (`QuantConfig.reduce_range`)? Not for Gather tables
        (dequantized, no integer kernel), depthwise Convs (ORT's depthwise QLinearConv
        accumulates in int32 and does not saturate) nor dynamic layers (their codes are stored
        as uint8 where u8 x s8 would saturate: onnxq.passes.dynamic_quantize)."""
        if node.op_type == "Gather" or not self.config.effective_reduce_range or node.name in self.dynamic:
            return False
        if node.op_type == "Conv":
            group = node.attributes.get("group")
            shape = weight.const_value.shape
            if group is not None and group.as_int() == shape[0] and shape[1] == 1:
                return False
        return True

    def other_node(self, node: ir.Node, rule) -> None:
        """A node not quantized as a compute node: a chain or join that joins its inputs'
        groups, or a float node with its reason."""
        plan, groups = self.plan, self.groups
        if node.name in self.excluded:
            plan.float_nodes[node.name] = node.op_type
            plan.float_reasons[node.name] = f"excluded by {self.excluded[node.name]!r}"
            return
        if rule is None:
            plan.float_nodes[node.name] = node.op_type
            plan.float_reasons.setdefault(node.name, "no integer kernel")
            return
        if rule.kind is OpKind.CHAIN:
            source = node.inputs[0]
            output = node.outputs[0]
            if (source is not None and source.name in groups and len(source.uses()) == 1
                    and not source.is_graph_output()):
                groups.extend(source.name, output.name)
                plan.quantized_nodes[node.name] = node.op_type
                return
        elif rule.kind is OpKind.JOIN:
            inputs = [node.inputs[i] for i in activation_input_indices(node, rule)
                      if i < len(node.inputs) and node.inputs[i] is not None]
            if inputs and all(not _is_constant(v) and v.name in groups for v in inputs):
                groups.add(node.outputs[0].name)
                plan.quantized_nodes[node.name] = node.op_type
                return
        plan.float_nodes[node.name] = node.op_type
        plan.float_reasons.setdefault(node.name, "inputs not quantized")

    def close_island(self, node: ir.Node, rule) -> None:
        """A join whose output is quantized (a compute node reads it) and whose inputs are
        quantized but for some read by it alone: ORT would run it in float between a
        DequantizeLinear and a QuantizeLinear (a float island: the swish x * sigmoid(k x) of
        PP-OCRv4, a Concat of a pooled and a float branch). Quantizing those inputs too lets
        ORT run its integer kernel (QLinearMul, QLinearAdd, QLinearConcat)."""
        if rule is None or rule.kind is not OpKind.JOIN:
            return
        missing = _island_inputs(node, rule, self.groups)
        if not missing:
            return
        for value in missing:
            self.groups.add(value.name)
        self.plan.quantized_nodes[node.name] = node.op_type
        self.plan.float_nodes.pop(node.name, None)
        self.plan.float_reasons.pop(node.name, None)


def _island_inputs(node: ir.Node, rule, groups: _Groups) -> list[ir.Value]:
    """The float activation inputs that keep a join between quantized tensors in float (its
    output and at least one input quantized; the others each read by this join alone); empty
    when it is no such island."""
    inputs = [node.inputs[i] for i in activation_input_indices(node, rule)
              if i < len(node.inputs) and node.inputs[i] is not None]
    if not inputs or node.outputs[0].name not in groups or any(_is_constant(v) for v in inputs):
        return []
    missing = [v for v in inputs if v.name not in groups]
    if len(missing) == len(inputs) or any(len(v.uses()) != 1 or v.is_graph_output() for v in missing):
        return []
    return missing


def _add_activation_groups(graph: ir.Graph, plan: QuantPlan, groups: _Groups, config: QuantConfig) -> None:
    activation_grid = INT8 if config.activation_type is ActivationType.INT8 else UINT8
    values = {v.name: v for v in _all_values(graph)}
    for tail, members in groups.members.items():
        consumers = sorted({use.node.name for m in members for use in values[m].uses()})
        plan.activation_groups.append(ActivationGroup(
            tensors=tuple(members), stats_tensor=tail, grid=activation_grid,
            symmetric=config.activation_type.symmetric, consumers=tuple(consumers)))


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs
