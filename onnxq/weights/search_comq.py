"""COMQ over a whole plan: per weight layer, rows and H in, `WeightParams` with COMQ's codes out.

Takes the Gram matrices of the layers' inputs (onnxq.weights.gram) and runs the numeric core
(onnxq.weights.comq) per layer and per Conv group. Layers COMQ cannot take (a MatMul weight of rank
> 2) keep their round-to-nearest parameters. The codes, scales and zero points returned (zero
points non-zero for the op types in `ComqSettings.asymmetric_ops`) are emitted as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxq.plan import WeightQuant
from onnxq.qparams import WeightParams
from onnxq.weights.comq import ComqSettings, comq
from onnxq.weights.gram import GramAccumulator, weight_from_rows, weight_rows

logger = logging.getLogger(__name__)


def comq_layers(model: ir.Model, specs: list[WeightQuant]) -> dict[WeightQuant, ir.Node]:
    """The weights COMQ can search: Conv, Gemm, and MatMul with a 2-D constant weight."""
    nodes = {node.name: node for node in model.graph}
    layers = {}
    for spec in specs:
        node = nodes[spec.node]
        weight = node.inputs[spec.input_index].const_value
        if node.op_type in ("Conv", "Gemm") or (node.op_type == "MatMul" and len(weight.shape) == 2):
            layers[spec] = node
    return layers


def gram_observers(layers: Mapping[WeightQuant, ir.Node]) -> dict[WeightQuant, GramAccumulator]:
    return {spec: GramAccumulator(node, node.inputs[spec.input_index].const_value.numpy())
            for spec, node in layers.items()}


def comq_weight_params(layers: Mapping[WeightQuant, ir.Node],
                       grams: Mapping[WeightQuant, GramAccumulator],
                       settings: ComqSettings) -> dict[WeightQuant, WeightParams]:
    """COMQ parameters for every layer whose Gram matrix saw data."""
    params = {}
    for spec, node in layers.items():
        gram = grams[spec]
        if gram.hessian is None:
            continue
        weight = node.inputs[spec.input_index].const_value.numpy()
        group = gram.geometry.group if gram.geometry is not None else 1
        rows = weight_rows(node, weight, group)
        # 8-bit weights stay symmetric: ORT's fast QLinearConv / QGemm kernels need a zero
        # weight zero point (asymmetric int8 Convs ran EfficientNet-Lite0 ~10x slower).
        symmetric = node.op_type not in settings.asymmetric_ops or spec.grid.bits >= 8
        result = comq(rows, gram.hessian, spec.grid, symmetric, settings)
        logger.debug("%s: error %.4g -> %.4g", spec.node, result.errors[0], result.errors[-1])
        row_scales = result.scale.reshape(-1)
        codes_in_layout = weight_from_rows(node, result.codes, weight.shape)
        params[spec] = WeightParams(scale=_scales_on_axis(row_scales, spec, weight.shape),
                                    zero_point=result.zero_point.reshape(-1).astype(spec.grid.dtype),
                                    codes=codes_in_layout.astype(spec.grid.dtype))
    return params


def _scales_on_axis(row_scales: np.ndarray, spec: WeightQuant, shape: tuple[int, ...]) -> np.ndarray:
    """COMQ keeps one scale per weight row, i.e. per output channel (the plan's axis)."""
    if spec.axis is None:
        raise ValueError(f"{spec.node}: COMQ needs per-channel weights")
    assert row_scales.size == shape[spec.axis]
    return row_scales.astype(np.float32)
