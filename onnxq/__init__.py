"""onnxq: post-training quantization of ONNX models.

    import onnxq
    result = onnxq.quantize("model.onnx", "calib.npz", onnxq.QuantConfig())
    result.save("model.int8.onnx")
"""

from onnxq.api import QuantResult, quantize
from onnxq.config import (
    ActivationType,
    CalibrationMethod,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantConfig,
    dump_config,
    load_config,
)
from onnxq.errors import OnnxqError

__all__ = [
    "ActivationType",
    "CalibrationMethod",
    "OnnxqError",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QuantConfig",
    "QuantResult",
    "dump_config",
    "load_config",
    "quantize",
]
__version__ = "0.1.0"
