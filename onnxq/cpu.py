"""What this CPU does to 8-bit integer kernels, for choices that depend on it.

ONNX Runtime's x86 integer GEMM (QLinearConv, QGemm, MatMulIntegerToFloat) multiplies uint8
activations by int8 weights. Without VNNI (AVX-VNNI, AVX512-VNNI) or AMX, the AVX2 kernel uses
vpmaddubsw, which adds two u8 x s8 products in int16 with saturation: 255 * 127 * 2 = 64770
overflows 32767, and large activations meeting large weights are silently clipped. Measured on
an AVX2-only EPYC with ORT 1.32: a small CNN's int8 model kept 0.92 output cosine to float
with the fused kernels against 0.99999 with the same Q/DQ model run unfused. Weights with 7-bit
codes ([-64, 63], "reduce range", as ONNX Runtime's own quantizer offers) cannot saturate:
255 * 64 * 2 = 32640.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

_SAFE_FLAGS = frozenset({"avx_vnni", "avx512_vnni", "amx_int8", "avxvnni"})


@functools.cache
def u8s8_saturates() -> bool:
    """True on an x86 CPU whose integer GEMM would saturate (no VNNI, no AMX); False on other
    architectures and where the CPU flags cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags_line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    flags = set(flags_line.partition(":")[2].split())
    return bool(flags) and not flags & _SAFE_FLAGS
