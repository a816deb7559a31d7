"""Graph passes over onnx-ir: preparing a float model and rewriting it with Q/DQ nodes.

`prepare()` is the fixed pipeline every model goes through before it is annotated:

    name nodes -> Constant nodes to initializers -> fold BatchNorm -> opset >= 13
      -> fold constant Pads into Conv / pooling pads -> fuse written-out HardSwish (opset >= 14
      then) -> shape inference -> remove dead nodes
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from onnxq.passes.fold_batchnorm import FoldBatchNormPass
from onnxq.passes.fold_pad import FoldPadPass
from onnxq.passes.fuse_hardswish import FuseHardSwishPass
from onnxq.passes.upgrade_opset import UpgradeOpsetPass

QDQ_MIN_OPSET = 13
INT4_MIN_OPSET = 21  # int4 / uint4 DequantizeLinear inputs


def prepare_pipeline(min_opset: int = QDQ_MIN_OPSET) -> ir.passes.PassManager:
    return ir.passes.PassManager([
        common.NameFixPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0),
        FoldBatchNormPass(),
        UpgradeOpsetPass(min_opset),
        FoldPadPass(),
        FuseHardSwishPass(),
        common.RemoveUnusedNodesPass(),
        common.ShapeInferencePass(strict_mode=False),
        common.NameFixPass(),
    ])


def prepare(model: ir.Model, min_opset: int = QDQ_MIN_OPSET) -> ir.Model:
    """Run the prepare pipeline; returns the (possibly new) prepared model."""
    return prepare_pipeline(min_opset)(model).model
