"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p.

Works on a batch of rows (B, V) so the batched engine can share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from zenlm.errors import ConfigError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_at_eot: bool = True
    # constrained decoding: given one row's tokens generated so far, the ids it may take next
    # (None: any). Retrieval uses it to make a reply copy a span of its context.
    allowed: Callable[[list[int]], Sequence[int] | None] | None = None

    def __post_init__(self) -> None:
        self.stop = [s for s in self.stop if s]  # an empty stop string would match at once
        if self.temperature < 0:
            raise ConfigError("temperature must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError("top_k must be >= 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty must be > 0")
        if self.max_new_tokens < 0:
            raise ConfigError("max_new_tokens must be >= 0")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as transformers applies it): divide positive logits, multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs > top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def restrict(logits: torch.Tensor, allowed, made: list[list[int]]) -> torch.Tensor:
    """``logits`` with every token a row's ``allowed(made[row])`` leaves out set to -inf."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for b, ids in enumerate(made):
        ok = allowed(ids)
        if ok is None:
            keep[b] = True
        else:
            keep[b, list(ok)] = True
    return logits.masked_fill(~keep, float("-inf"))


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None, made: list[list[int]] | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); ``made`` (each row's generated
    ids) is needed only under ``cfg.allowed``."""
    logits = logits.float()
    if cfg.allowed is not None and made is not None:
        logits = restrict(logits, cfg.allowed, made)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
