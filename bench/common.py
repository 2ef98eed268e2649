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
