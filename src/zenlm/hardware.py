"""What the machine can do fast, so that ``auto`` settings pick the fast path only where it is.

Machines of one kind are not one CPU: an AVX2-only core emulates bf16 (every product converts
in software, far slower than fp32), while one with AVX512-BF16 or AMX runs it faster than fp32.
Choosing by the flags in ``/proc/cpuinfo`` (and oneDNN's own check) costs nothing at start-up
and cannot be fooled by a busy machine the way a timing probe can. Every fast path asks here,
through :func:`cpu_flags` and :func:`onednn_bf16`, so tests take both branches on any machine
by faking those two.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# The flags that change which kernels run, in the order a reader compares machines by.
FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                     "avx512_bf16", "amx_bf16", "amx_int8", "f16c")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_model() -> str:
    """The CPU's name with its family and model numbers, which tell apart cores a generic name
    hides ("AMD EPYC" is family 25 on Zen 3/4, 26 on Zen 5)."""
    import platform

    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in info:
        name += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    return name


def onednn_bf16() -> bool:
    """oneDNN's own answer: whether it has bf16 kernels for this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls on ``device`` run natively (faster than fp32), not emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return onednn_bf16() and any(f in cpu_flags() for f in NATIVE_BF16_FLAGS)


def resolve_dtype(dtype: str, device: str | torch.device = "cpu") -> str:
    """``auto`` -> ``bf16`` where it is native on ``device``, else ``fp32``; others unchanged."""
    if dtype == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return dtype


def describe() -> str:
    """One line naming the CPU and its kernel-relevant flags: printed by CI and the benches,
    so every figure says which machine it came from."""
    flags = cpu_flags()
    have = [f for f in FLAGS_THAT_MATTER if f in flags]
    return (f"{cpu_model()}; flags: {' '.join(have) or 'none of ' + ' '.join(FLAGS_THAT_MATTER)}; "
            f"native bf16: {'yes' if native_bf16() else 'no'}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def main() -> None:
    print(describe())


if __name__ == "__main__":
    main()

__all__ = ["FLAGS_THAT_MATTER", "NATIVE_BF16_FLAGS", "cpu_flags", "cpu_model", "describe",
           "native_bf16", "onednn_bf16", "resolve_dtype"]
