"""What every benchmark here shares."""

from __future__ import annotations

import time


def peak_matmul_gflops(n: int = 2048, reps: int = 8, dtype=None) -> float:
    """This machine's best matmul rate right now (fp32 unless ``dtype``): the denominator of
    model FLOPs utilisation. Both GEMM libraries in the torch wheel are timed — ATen's (MKL on
    x86) and oneDNN's — and the faster counts: on AMD CPUs MKL runs AVX2 code at about half of
    what the cores can do, and an MFU against that would pass 100%."""
    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    products = [lambda: a @ b]
    if torch.backends.mkldnn.is_available():
        bt = b.t().contiguous()
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], ""))
    best = 0.0
    for product in products:
        try:
            for _ in range(2):
                product()
        except RuntimeError:  # this build's oneDNN lacks the op or the dtype
            continue
        t = time.perf_counter()
        for _ in range(reps):
            product()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def read_bandwidth_gbs(mb: int = 512, reps: int = 5) -> float:
    """This machine's memory read rate right now (GB/s): a sum over an array far larger than
    any cache, best of ``reps``. Decoding one token reads every weight once, so this is the
    ceiling decode tokens/s are held against (bytes per token / this)."""
    import torch

    a = torch.ones(mb * (1 << 20) // 4)
    a.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best / 1e9


def bytes_read_per_token(model) -> int:
    """The bytes of weights one decoding step reads: every parameter and buffer of the model
    except the embedding table (a gather reads a row, not the table) unless the head reads it
    (tied), and the rotary tables (a row per step). An int4 layer holds its weights twice
    (torch's packed layout and the fused step's blocks): only the copy a step reads counts."""
    from zenlm.infer.fused import FusedDecode
    from zenlm.infer.quantize import Int4Linear

    skip = {"rope_cos", "rope_sin"}
    fused = isinstance(model.__dict__.get("decode_forward"), FusedDecode)
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            unread = ("packed", "scales_zeros") if fused and m.blocks is not None else ("blocks",)
            skip.update(f"{name}.{b}" for b in unread)
    head_is_embedding = getattr(model, "lm_head", None) is None
    if not head_is_embedding:
        skip.add("tok_emb.weight")
    if getattr(model, "pos_emb", None) is not None:
        skip.add("pos_emb.weight")
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in skip or t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def machine() -> dict:
    """The CPU behind every figure: its name, the flags that choose kernels, the threads, and
    which build of the fused decode step this machine gets (``zenlm.infer.native.isa``)."""
    from zenlm import hardware
    from zenlm.infer import native

    try:
        build = native.isa() if native.enabled() and native.cpu_supported() else "off"
    except ValueError as e:  # a ZENLM_FUSED_ISA this CPU cannot run
        build = f"invalid ({e})"
    return {"cpu": hardware.cpu_model(), "flags": sorted(f for f in hardware.FLAGS_THAT_MATTER
                                                        if f in hardware.cpu_flags()),
            "native_bf16": hardware.native_bf16(), "fused_build": build,
            "describe": f"{hardware.describe()}; fused decode build: {build}"}
