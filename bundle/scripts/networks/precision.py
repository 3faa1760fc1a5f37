"""Reduced precision on the device at hand: bfloat16 on CPUs that compute it natively, float16 AMP on CUDA, int8
where the CPU has int8 dot products.

One place answers "may this device run this in reduced precision?", so that a machine without the instructions
falls back to float32 with a message instead of running an emulated, slower bfloat16 or a saturating int8.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from pathlib import Path

import torch

__all__ = ["cpu_has_bf16", "cpu_has_int8_dot", "reduced_precision"]

logger = logging.getLogger(__name__)

# CPU flags of int8 dot-product instructions (x86 VNNI and AMX, ARM's dot product), as /proc/cpuinfo names them.
_INT8_DOT_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX) that oneDNN uses."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    check = getattr(mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI, AMX or ARM's dot product).

    Without them ONNX Runtime's x86 int8 convolutions use AVX2's ``vpmaddubsw``, whose 16-bit sums of uint8 x int8
    products can saturate: the answer would change, not only the speed. Apple silicon has the dot product and no
    /proc/cpuinfo.
    """
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.system() == "Darwin" and platform.machine() == "arm64"
    flags = {flag for line in lines if line.startswith(("flags", "Features")) for flag in line.split(":", 1)[1].split()}
    return bool(flags & _INT8_DOT_FLAGS)


def reduced_precision(device: str | torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """An autocast context: float16 on CUDA, bfloat16 on a CPU that has it, else none (float32, with a message)."""
    device = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    logger.info("this CPU has no native bfloat16: running in float32")
    return contextlib.nullcontext()
