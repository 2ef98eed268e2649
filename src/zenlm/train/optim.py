"""AdamW with weight decay on matrices only, and a warmup + cosine schedule.

Decay pulls weights toward zero; on norm gains and biases that only fights the model (a gain
of zero switches a channel off), so those live in a no-decay group — as nanoGPT and most LLM
recipes do. Groups carry a ``name`` and an ``lr_scale``; layer-wise LR decay makes one pair of
groups per depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, *, layer_decay: float = 1.0,
                 n_layer: int | None = None) -> list[dict]:
    """AdamW groups: decay on matrices, none on vectors; with ``layer_decay`` < 1, one pair of
    groups per depth whose ``lr_scale`` is ``layer_decay ** (layers from the top)``.

    Depth 0 is the embeddings (with an encoder's segment embeddings and their norm), depth i+1 block i, depth L+1 everything above the blocks (final
    norm, LM head, task heads), which keeps the full LR. Layer-wise decay (as in ELECTRA and
    BEiT fine-tuning) lets the task-specific top move fast while the general-purpose bottom
    layers change little. The loop multiplies each group's LR by its ``lr_scale``.
    """
    from zenlm.model.lora import layer_of

    if not 0.0 < layer_decay <= 1.0:
        from zenlm.errors import ConfigError

        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if layer_decay == 1.0:
        decay, no_decay = [], []
        for _, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 else no_decay).append(p)
        return [
            {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        ]
    if n_layer is None:
        n_layer = 1 + max((layer_of(n) or 0) for n, _ in model.named_parameters())
    top = n_layer + 1
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_of(name)
        if layer is not None:
            depth = layer + 1
        elif any(part in name for part in ("tok_emb", "pos_emb", "type_emb", "emb_norm")):
            depth = 0
        else:
            depth = top
        kind = "decay" if p.dim() >= 2 else "no_decay"
        key = f"layer_{depth:02d}.{kind}"
        group = groups.setdefault(key, {"name": key, "params": [], "lr_scale": layer_decay ** (top - depth),
                                        "weight_decay": weight_decay if kind == "decay" else 0.0})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def describe_groups(groups: list[dict]) -> list[dict]:
    """What each group is, for the run's saved config: name, LR scale, decay, parameter count."""
    return [{"name": g["name"], "lr_scale": float(g.get("lr_scale", 1.0)),
             "weight_decay": float(g["weight_decay"]),
             "params": int(sum(p.numel() for p in g["params"]))} for g in groups]


def make_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
               eps: float, device: str, groups: list[dict] | None = None) -> torch.optim.AdamW:
    """Fused AdamW where this torch build has it for the device (one kernel for all params).

    ``groups`` (from :func:`param_groups`) replaces the default decay/no-decay pair."""
    groups = param_groups(model, weight_decay) if groups is None else groups
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def lr_at(progress: float, step: int, *, lr: float, min_lr_ratio: float, warmup_steps: int | None,
          warmup_frac: float, max_steps: int | None = None, schedule: str = "cosine") -> float:
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio as progress goes 0 -> 1.

    ``progress`` is the fraction of the run done (by steps or by wall-clock, whichever is
    further), so a run with a time budget decays on schedule however fast the machine is.
    Warmup is ``warmup_steps`` steps when given, else the first ``warmup_frac`` of the run; the
    cosine starts where warmup ends, so the LR never jumps.

    ``schedule="inverse_sqrt"`` decays as 1/sqrt(time) after warmup instead (the original
    Transformer's schedule): lr * sqrt(warmup / t), in steps or in progress as warmup is given.
    """
    if warmup_steps is not None:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        if schedule == "inverse_sqrt":
            return lr * math.sqrt(warmup_steps / (step + 1))
        start = warmup_steps / max_steps if max_steps else 0.0
    else:
        if progress < warmup_frac:
            return lr * max(progress, 1e-3) / warmup_frac
        if schedule == "inverse_sqrt":
            return lr * math.sqrt(warmup_frac / progress)
        start = warmup_frac
    t = min(max((progress - start) / max(1.0 - start, 1e-9), 0.0), 1.0)
    floor = lr * min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * t))
