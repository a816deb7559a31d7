"""Emit: (model, plan, qparams) -> a new quantized model. Chooses no scale of its own.

The input model is not modified: the Q/DQ rewrite runs on a copy. `EmitOptions` (layout only:
MatMulNBits, int2 containers) come from the config through `emit_options`. Where the plan's
containers need a newer opset than the prepared model has (int2: 25), the copy is upgraded
first with the same version converter `prepare` uses.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.passes.insert_qdq import EmitOptions, InsertQDQPass, required_opset
from onnxq.passes.upgrade_opset import UpgradeOpsetPass
from onnxq.plan import QuantPlan
from onnxq.qparams import QParams

__all__ = ["EmitOptions", "emit", "emit_options"]


def emit_options(config: QuantConfig) -> EmitOptions:
    """The emitter's layout options from a config."""
    return EmitOptions(matmul_nbits=config.matmul_nbits,
                       nbits_accuracy_level=config.nbits_accuracy_level)


def emit(model: ir.Model, plan: QuantPlan, qparams: QParams,
         options: EmitOptions | None = None) -> ir.Model:
    """The quantized copy of a prepared model."""
    options = options or EmitOptions()
    copy = ir.from_proto(ir.to_proto(model))
    needed = required_opset(copy, plan, qparams, options)
    if copy.opset_imports.get("", 1) < needed:
        copy = UpgradeOpsetPass(needed)(copy).model
    return InsertQDQPass(plan, qparams, options)(copy).model
