"""Errors that onnxq reports to users.

Every failure that bad input can cause is an `OnnxqError`: the CLI prints its message as one
line on stderr and exits non-zero, and nothing is written. Anything else escaping is a bug.
"""


class OnnxqError(Exception):
    """A problem with the user's model, data, config or paths, stated in one line."""

    exit_code = 2


class ModelError(OnnxqError):
    """The model file is missing, not ONNX, truncated, or uses something we cannot handle."""


class CalibrationDataError(OnnxqError):
    """Calibration feeds are missing or do not match the model (names, shapes, dtypes, NaN)."""


class ConfigError(OnnxqError):
    """A config value or file is invalid, or a selection matched nothing."""


class VerificationError(OnnxqError):
    """The quantized model failed a check before it was written."""

    exit_code = 3
