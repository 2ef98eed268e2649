"""What the machine can do fast, so that ``auto`` settings pick the fast path only where it is.

bf16 is the case in point: on CPUs with native bf16 dot products (AVX512-BF16, AMX) a bf16
matmul runs several times faster than fp32 (measured on this project's AMD EPYC: 863 against
198 GFLOP/s), while on AVX2-only CPUs it is emulated and ~100x slower. Choosing by a flag in
``/proc/cpuinfo`` (and oneDNN's own check) costs nothing at start-up and cannot be fooled by a
busy machine the way a timing probe can.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls on ``device`` run natively (faster than fp32), not emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    return onednn and any(f in cpu_flags() for f in NATIVE_BF16_FLAGS)


def resolve_dtype(dtype: str, device: str | torch.device = "cpu") -> str:
    """``auto`` -> ``bf16`` where it is native on ``device``, else ``fp32``; others unchanged."""
    if dtype == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return dtype


__all__ = ["cpu_flags", "native_bf16", "resolve_dtype"]
