"""AdamW with weight decay on matrices only, and a warmup + cosine schedule.

Decay pulls weights toward zero; on norm gains and biases that only fights the model (a gain
of zero switches a channel off), so those live in a no-decay group — as nanoGPT and most LLM
recipes do. Groups carry a ``name`` so later layer-wise LR decay can add more of them.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def make_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
               eps: float, device: str) -> torch.optim.AdamW:
    """Fused AdamW where this torch build has it for the device (one kernel for all params)."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def lr_at(progress: float, step: int, *, lr: float, min_lr_ratio: float, warmup_steps: int | None,
          warmup_frac: float, max_steps: int | None = None) -> float:
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio as progress goes 0 -> 1.

    ``progress`` is the fraction of the run done (by steps or by wall-clock, whichever is
    further), so a run with a time budget decays on schedule however fast the machine is.
    Warmup is ``warmup_steps`` steps when given, else the first ``warmup_frac`` of the run; the
    cosine starts where warmup ends, so the LR never jumps.
    """
    if warmup_steps is not None:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        start = warmup_steps / max_steps if max_steps else 0.0
    else:
        if progress < warmup_frac:
            return lr * max(progress, 1e-3) / warmup_frac
        start = warmup_frac
    t = min(max((progress - start) / max(1.0 - start, 1e-9), 0.0), 1.0)
    floor = lr * min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * t))
