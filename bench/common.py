"""What every benchmark here shares."""

from __future__ import annotations

import time


def peak_matmul_gflops(n: int = 2048, reps: int = 8, dtype=None) -> float:
    """This machine's matmul rate right now (fp32 unless ``dtype``): the denominator of model
    FLOPs utilisation."""
    import torch

    dtype = dtype or torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9
