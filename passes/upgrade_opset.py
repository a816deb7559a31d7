"""Raise the default-domain opset to what QDQ needs (13: per-channel DequantizeLinear).

Uses ONNX's version converter, which rewrites ops whose signature changed between opsets
(e.g. Clip's min/max attributes becoming inputs at 11, Squeeze's axes becoming an input at 13).
A model already at or past the target is left alone.
"""

from __future__ import annotations

import logging

import onnx
import onnx.version_converter
import onnx_ir as ir

from onnxq.errors import ModelError

logger = logging.getLogger(__name__)


class UpgradeOpsetPass(ir.passes.FunctionalPass):
    """Convert the model to `target` opset of the default domain when it is older."""

    def __init__(self, target: int = 13) -> None:
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        if current >= self.target:
            return ir.passes.PassResult(model.clone(), modified=False)
        proto = ir.to_proto(model)
        try:
            converted = onnx.version_converter.convert_version(proto, self.target)
        except Exception as error:  # the converter raises bare RuntimeErrors per op
            raise ModelError(f"cannot upgrade the model from opset {current} to {self.target}: "
                             f"{str(error).splitlines()[0]}") from None
        logger.info("upgraded opset %d -> %d", current, self.target)
        return ir.passes.PassResult(ir.from_proto(converted), modified=True)
