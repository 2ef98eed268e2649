"""Building and loading the native kernels (``kernels/decode.cpp``), once per instruction set.

Its own module because two others use the extension: :mod:`zenlm.infer.fused` for the decode
step and :mod:`zenlm.infer.quantize` for int4 prefill's dequantization. The kernel is built with
the system's g++ on first use into a per-user cache, one build per instruction set
(:func:`isa`): AVX2 + FMA, or AVX-512 (with VNNI) where the CPU reports it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "ZENLM_FUSED"  # "0" turns the native step off
ISA_ENV = "ZENLM_FUSED_ISA"  # "avx2" or "avx512": which build to use (default: the widest the CPU has)
SOURCE = Path(__file__).with_name("kernels") / "decode.cpp"
CPU_FLAGS = ("avx2", "fma")  # (and F16C, for an fp16 KV cache: every AVX2 CPU has it, none lacks it)
# Each build's compiler flags. The AVX-512 build runs the same code over 16-float vectors, which
# doubles what a batched product does per cycle where the CPU has two 512-bit FMA units, and
# VNNI's integer products (int8 weights against int16 inputs) double an int8 batch's again.
ISAS = {"avx2": ("-mavx2", "-mfma", "-mf16c"),
        "avx512": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vnni")}
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")  # what the AVX-512 build needs


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cpu_supported() -> bool:
    from zenlm.hardware import cpu_flags

    flags = cpu_flags()
    return all(f in flags for f in CPU_FLAGS)


def avx512_missing() -> list[str]:
    """The flags of :data:`AVX512_FLAGS` this CPU does not report (empty: the AVX-512 build runs)."""
    from zenlm.hardware import cpu_flags

    flags = cpu_flags()
    return [f for f in AVX512_FLAGS if f not in flags]


def isa() -> str:
    """The build the native step uses here: ``ZENLM_FUSED_ISA`` if set, else AVX-512 where the
    CPU reports all of :data:`AVX512_FLAGS` (Ice Lake and later Xeons, Zen 4 and later; an
    AVX-512 CPU without VNNI, such as Skylake-X, takes AVX2), else AVX2. Asking for AVX-512 on a
    CPU without it is an error, not a crash on the first illegal instruction.
    ``ONEDNN_MAX_CPU_ISA=AVX2`` or ``ATEN_CPU_CAPABILITY=avx2`` (how an AVX-512 machine is told
    to run AVX2 kernels, to check those paths) choose the AVX2 build too."""
    missing = avx512_missing()
    want = os.environ.get(ISA_ENV, "").strip().lower()
    if want:
        if want not in ISAS:
            raise ValueError(f"{ISA_ENV}={want!r}: expected one of {', '.join(ISAS)}")
        if want == "avx512" and missing:
            raise ValueError(f"{ISA_ENV}=avx512, but this CPU does not report {', '.join(missing)}")
        return want
    capped = (os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in ("AVX2", "AVX2_VNNI", "AVX", "SSE41")
              or os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() in ("avx2", "default"))
    return "avx512" if not missing and not capped else "avx2"


def build_dir() -> Path:
    """A per-user cache of the built extension, one folder per torch version and per copy of the
    source: built once, then imported in a fraction of a second. (torch's build files name the
    source's path, so two checkouts sharing one folder rebuilt it in turn, 35 s a time.)"""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    where = hashlib.sha256(str(SOURCE.resolve()).encode()).hexdigest()[:12]
    return base / "zenlm" / "kernels" / f"torch-{torch.__version__}-{where}"


@functools.cache
def _load(which: str):
    from torch.utils import cpp_extension

    name = "zenlm_decode" if which == "avx2" else f"zenlm_decode_{which}"
    # a folder per build: torch writes one build.ninja and one decode.o per folder, so two
    # builds sharing it would rebuild each other in turn
    folder = build_dir() / which
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / f"{name}.so").exists():
        log.warning("zenlm: building the native decode step (%s) into %s (once; about a minute)", which, folder)
    # -ffp-contract=off: no multiply-adds fused but the written ones, so a row sums alike in
    # every kernel (alone or in a batch). Threads are the kernel's own (as many as torch's).
    return cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(folder),
                              extra_cflags=["-O3", *ISAS[which], "-ffp-contract=off"], verbose=False)


def native(which: str | None = None):
    """The built extension module for ``which`` build (default :func:`isa`), or None (logged
    once) where it cannot be built."""
    try:
        return _load(which or isa())
    except Exception as e:  # no compiler, no headers, a failed build: the torch path stays
        if not getattr(native, "_logged", False):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("zenlm: fused decode step unavailable, decoding through torch (%s)", first)
            native._logged = True
        return None


__all__ = ["AVX512_FLAGS", "CPU_FLAGS", "ENV", "ISAS", "ISA_ENV", "SOURCE", "avx512_missing", "build_dir", "cpu_supported",
           "enabled", "isa", "native"]
