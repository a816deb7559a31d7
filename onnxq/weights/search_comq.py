"""COMQ over a whole plan: per weight layer, rows and H in, `WeightParams` with COMQ's codes out.

Takes the Gram matrices of the layers' inputs (onnxq.weights.gram) and runs the numeric core
(onnxq.weights.comq, or onnxq.weights.comq_groups for group-wise scales) per layer and per Conv
group. Layers COMQ cannot take (a MatMul weight of rank
> 2) keep their round-to-nearest parameters. The codes, scales and zero points returned (zero
points non-zero for the op types in `ComqConfig.asymmetric_ops`) are emitted as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxq.config import ComqConfig, RtnConfig
from onnxq.index import ModelIndex
from onnxq.plan import WeightQuant
from onnxq.qparams import WeightParams
from onnxq.weights.comq import ComqResult, comq
from onnxq.weights.comq_groups import comq_groups
from onnxq.weights.gram import GramAccumulator, weight_from_rows, weight_rows
from onnxq.weights.registry import Observers, register
from onnxq.weights.rtn import RoundToNearest

logger = logging.getLogger(__name__)


@register(ComqConfig)
class ComqSearcher:
    """COMQ for the layers it can take (with a Gram matrix that saw data), round to nearest for
    the others; results cached per (layer, bits)."""

    def __init__(self, config: ComqConfig, index: ModelIndex, specs: Sequence[WeightQuant]) -> None:
        self.config = config
        self.targets = comq_layers(index, specs)
        self.searched_layers = frozenset(spec.node for spec in self.targets)
        self.grams = {spec.node: gram for spec, gram in gram_observers(self.targets).items()}
        self._nodes = {spec.node: node for spec, node in self.targets.items()}
        self._fallback = RoundToNearest(RtnConfig(), index, specs)
        self._cache: dict[WeightQuant, WeightParams] = {}

    def observers(self) -> Observers:
        return input_observers(self.grams, self._nodes)

    def params(self, spec: WeightQuant) -> WeightParams:
        if spec not in self._cache:
            gram = self.grams.get(spec.node)
            found = {} if gram is None else comq_weight_params({spec: self._nodes[spec.node]},
                                                                {spec: gram}, self.config)
            self._cache[spec] = found.get(spec) or self._fallback.params(spec)
        return self._cache[spec]


def input_observers(grams: Mapping[str, GramAccumulator], nodes: Mapping[str, ir.Node]) -> Observers:
    """{input tensor of each layer: [its Gram accumulator]} for layers keyed by node name."""
    observers: dict[str, list[GramAccumulator]] = {}
    for layer, gram in grams.items():
        observers.setdefault(nodes[layer].inputs[0].name, []).append(gram)
    return observers


def comq_layers(index: ModelIndex, specs: Sequence[WeightQuant]) -> dict[WeightQuant, ir.Node]:
    """The weights COMQ can search: Conv, Gemm, and MatMul with a 2-D constant weight."""
    layers = {}
    for spec in specs:
        node = index.node(spec.node)
        weight = node.inputs[spec.input_index].const_value
        if node.op_type in ("Conv", "Gemm") or (node.op_type == "MatMul" and len(weight.shape) == 2):
            layers[spec] = node
    return layers


def gram_observers(layers: Mapping[WeightQuant, ir.Node]) -> dict[WeightQuant, GramAccumulator]:
    return {spec: GramAccumulator(node, node.inputs[spec.input_index].const_value.numpy())
            for spec, node in layers.items()}


def comq_weight_params(layers: Mapping[WeightQuant, ir.Node],
                       grams: Mapping[WeightQuant, GramAccumulator],
                       settings: ComqConfig,
                       targets: Mapping[WeightQuant, np.ndarray] | None = None,
                       ) -> dict[WeightQuant, WeightParams]:
    """COMQ parameters for every layer whose Gram matrix saw data; each layer's weight is the
    one to approach unless `targets` gives other rows (groups, rows, d_in) for it."""
    params = {}
    for spec, node in layers.items():
        gram = grams[spec]
        if gram.hessian is None:
            continue
        weight = node.inputs[spec.input_index].const_value.numpy()
        group = gram.geometry.group if gram.geometry is not None else 1
        rows = targets[spec] if targets and spec in targets else weight_rows(node, weight, group)
        # the plan decides (WeightQuant.symmetric): 8-bit weights and Convs stored fast stay
        # symmetric, since ORT's fast QLinearConv / QGemm kernels need a zero weight zero
        # point (asymmetric int8 Convs ran EfficientNet-Lite0 ~10x slower)
        symmetric = spec.symmetric
        if spec.group_size:
            result = comq_groups(rows, gram.hessian, spec.grid, symmetric, spec.group_size, settings)
        else:
            result = comq(rows, gram.hessian, spec.grid, symmetric, settings)
        logger.debug("%s: error %.4g -> %.4g", spec.node, result.errors[0], result.errors[-1])
        codes_in_layout = weight_from_rows(node, result.codes, weight.shape).astype(spec.grid.dtype)
        if spec.group_size:
            params[spec] = _group_params(result, spec, codes_in_layout)
            continue
        row_scales = result.scale.reshape(-1)
        params[spec] = WeightParams(scale=_scales_on_axis(row_scales, spec, weight.shape),
                                    zero_point=result.zero_point.reshape(-1).astype(spec.grid.dtype),
                                    codes=codes_in_layout)
    return params


def _group_params(result: ComqResult, spec: WeightQuant, codes: np.ndarray) -> WeightParams:
    """Per-row group scales (G, rows, groups) in the blocked layout of the weight's grouped view
    (onnxq.numerics): rows are output channels, so a view blocked along axis 0 (a MatMul's
    (K, N)) takes them transposed."""
    def laid_out(values: np.ndarray) -> np.ndarray:
        values = values.reshape(-1, values.shape[-1])
        return values.T if spec.block_axis == 0 else values

    return WeightParams(scale=np.ascontiguousarray(laid_out(result.scale)).astype(np.float32),
                        zero_point=np.ascontiguousarray(laid_out(result.zero_point)).astype(spec.grid.dtype),
                        codes=codes, group_size=spec.group_size, block_axis=spec.block_axis)


def _scales_on_axis(row_scales: np.ndarray, spec: WeightQuant, shape: tuple[int, ...]) -> np.ndarray:
    """COMQ keeps one scale per weight row, i.e. per output channel (the plan's axis)."""
    if spec.axis is None:
        raise ValueError(f"{spec.node}: COMQ needs per-channel weights")
    assert row_scales.size == shape[spec.axis]
    return row_scales.astype(np.float32)
