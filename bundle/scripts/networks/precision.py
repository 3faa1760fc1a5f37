"""Reduced precision on the device at hand: bfloat16 on CPUs that compute it natively, float16 AMP on CUDA.

One place answers "may this device run this in reduced precision?", so that a machine without the instructions
falls back to float32 with a message instead of running an emulated, slower bfloat16.
"""

from __future__ import annotations

import contextlib
import logging

import torch

__all__ = ["cpu_has_bf16", "reduced_precision"]

logger = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX) that oneDNN uses."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    check = getattr(mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


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
