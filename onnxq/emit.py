"""Emit: (model, plan, qparams) -> a new quantized model. Chooses no scale of its own.

The input model is not modified: the Q/DQ rewrite runs on a copy (a shallow one, tensors
shared, for a model whose weights are mapped from files), whose tensors are all in memory when
it is returned. `EmitOptions` (layout only:
MatMulNBits, int2 containers) come from the config through `emit_options`. Where the plan's
containers need a newer opset than the prepared model has (int2: 25), the copy is upgraded
first with the same version converter `prepare` uses. Dynamic layers (the plan's
`dynamic_layers`) are rewritten after the Q/DQ pass, into DynamicQuantizeLinear and an integer
MatMul (onnxq.passes.dynamic_quantize); layers with float activations (`float_activations`)
are rewired to the float tensor in front of their input's Q/DQ pair, their weights left
quantized (onnxq.passes.float_activations). A Pad left between a DequantizeLinear and a
QuantizeLinear of one group is moved onto the codes (onnxq.passes.integer_pad).
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq import model_io
from onnxq.config import QuantConfig
from onnxq.passes.dynamic_quantize import DynamicQuantizePass
from onnxq.passes.float_activations import FloatActivationsPass
from onnxq.passes.insert_qdq import EmitOptions, InsertQDQPass, required_opset
from onnxq.passes.integer_pad import IntegerPadPass
from onnxq.passes.upgrade_opset import UpgradeOpsetPass
from onnxq.plan import QuantPlan
from onnxq.qparams import QParams

__all__ = ["EmitOptions", "emit", "emit_options"]


def emit_options(config: QuantConfig) -> EmitOptions:
    """The emitter's layout options from a config."""
    return EmitOptions(matmul_nbits=config.matmul_nbits,
                       nbits_accuracy_level=config.nbits_accuracy_level,
                       low_bit_convs_int8=config.conv_storage == "fast",
                       dynamic_uint8_weights=config.effective_reduce_range)


def emit(model: ir.Model, plan: QuantPlan, qparams: QParams,
         options: EmitOptions | None = None) -> ir.Model:
    """The quantized copy of a prepared model."""
    options = options or EmitOptions()
    # a model with weights mapped from files (past 2 GB) is copied shallowly: tensors shared, the
    # passes replace tensors and never change them; others through a proto, as they always were
    copy = model.clone() if model_io.has_external_tensors(model) else ir.from_proto(ir.to_proto(model))
    static = plan.static_part()
    needed = required_opset(copy, static, qparams, options)
    if copy.opset_imports.get("", 1) < needed:
        copy = UpgradeOpsetPass(needed)(copy).model
    copy = InsertQDQPass(static, qparams, options)(copy).model
    copy = IntegerPadPass()(copy).model  # Pads that did not fold run on codes
    if plan.float_activations:
        copy = FloatActivationsPass(plan.float_activations)(copy).model
    if plan.dynamic_layers:
        copy = DynamicQuantizePass(plan, qparams, options.dynamic_uint8_weights)(copy).model
    return model_io.in_memory(copy)  # float tensors left mapped from a file are read in
