"""What every benchmark here shares."""

from __future__ import annotations

import time


def peak_matmul_gflops(n: int = 2048, reps: int = 8) -> float:
    """This machine's fp32 matmul rate right now: the denominator of model FLOPs utilisation."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9
