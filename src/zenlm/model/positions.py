"""The fixed sinusoidal position table of the original Transformer (Vaswani et al. 2017).

Laid out as Marian lays it out (sines in the first half of the channels, cosines in the second,
not interleaved), so a model exports to a Marian folder with its positions unchanged.
"""

from __future__ import annotations

import torch


def sinusoidal_table(max_len: int, d: int) -> torch.Tensor:
    """(max_len, d): channel j < d/2 is sin(p / 10000^(2j/d)), channel d/2 + j its cosine."""
    # computed on the CPU in float64 even under a meta-device build (real values are needed)
    half = (d + 1) // 2
    freq = 10000.0 ** (-2.0 * torch.arange(half, dtype=torch.float64, device="cpu") / d)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device="cpu"), freq)
    return torch.cat([angles.sin(), angles.cos()[:, : d // 2]], dim=-1).float()
