"""BERT's masking for masked-LM pretraining: which tokens to predict and what the model sees.

Each token that is not special is chosen with probability ``rate`` (BERT: 15%; Cramming-style
recipes 25-30%). A chosen token is replaced by the mask token 80% of the time, by a random token
10%, and left as it is 10% (the ``mask_frac`` / ``random_frac`` split): the model cannot learn
that only ``[MASK]`` positions matter, since at fine-tuning time there are none. The loss is
counted on the chosen positions only; every other target is -100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zenlm.errors import ConfigError


@dataclass
class MaskingConfig:
    rate: float = 0.15  # share of (non-special) tokens to predict
    mask_frac: float = 0.8  # of those: replaced by the mask token
    random_frac: float = 0.1  # of those: replaced by a random token (the rest stay as they are)

    def __post_init__(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ConfigError(f"mlm.rate must be between 0 and 1, got {self.rate}")
        if self.mask_frac < 0 or self.random_frac < 0 or self.mask_frac + self.random_frac > 1.0:
            raise ConfigError(f"mlm.mask_frac ({self.mask_frac}) and mlm.random_frac "
                              f"({self.random_frac}) must be shares adding up to at most 1")


def mask_tokens(ids: torch.Tensor, gen: torch.Generator, *, mask_id: int, vocab_size: int,
                cfg: MaskingConfig | None = None, special_ids: list[int] | tuple[int, ...] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for token rows ``ids``: inputs with the chosen tokens replaced as BERT
    does, targets holding the original token at chosen positions and -100 everywhere else.
    Random replacements are drawn from ``[0, vocab_size)``; ``gen`` makes it reproducible."""
    cfg = cfg or MaskingConfig()
    shape = ids.shape
    chosen = torch.rand(shape, generator=gen) < cfg.rate
    for s in special_ids:
        chosen &= ids != s
    action = torch.rand(shape, generator=gen)
    to_mask = chosen & (action < cfg.mask_frac)
    to_random = chosen & (action >= cfg.mask_frac) & (action < cfg.mask_frac + cfg.random_frac)
    random_ids = torch.randint(0, vocab_size, shape, generator=gen)
    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    targets = torch.where(chosen, ids, torch.full_like(ids, -100))
    return inputs, targets


__all__ = ["MaskingConfig", "mask_tokens"]
