"""Emit: (model, plan, qparams) -> a new quantized model. Chooses no scale of its own.

The input model is not modified: the Q/DQ rewrite runs on a copy.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.passes.insert_qdq import InsertQDQPass
from onnxq.plan import QuantPlan
from onnxq.qparams import QParams


def emit(model: ir.Model, plan: QuantPlan, qparams: QParams) -> ir.Model:
    """The quantized copy of a prepared model."""
    copy = ir.from_proto(ir.to_proto(model))
    return InsertQDQPass(plan, qparams)(copy).model
