"""Task heads over :meth:`Transformer.hidden_states`: sequence classification today.

A head reads the final-norm hidden states, pools one vector per sequence and maps it to class
logits. How to pool is a switch, because it depends on who can see what:

- ``last``: the last non-padding token. In a causal decoder that is the only position that has
  seen the whole text, and right padding after it cannot change it (causal attention never
  looks ahead), so padded batches need no attention mask. Hugging Face's
  ``*ForSequenceClassification`` decoders pool the same token.
- ``first``: position 0, the ``[CLS]`` token of BERT-style encoders.
- ``mean``: the mean over non-padding positions (sentence-embedding encoders).

``auto`` picks ``last`` for causal models and ``mean`` for encoders.
"""

from __future__ import annotations

import torch
from torch import nn

from zenlm.errors import ConfigError
from zenlm.model.linear import Linear

POOLINGS = ("auto", "last", "first", "mean")


def pool(hidden: torch.Tensor, lengths: torch.Tensor, kind: str) -> torch.Tensor:
    """One vector per row of ``hidden`` (B, T, d); row i holds ``lengths[i]`` real tokens
    followed by padding."""
    if kind == "last":
        rows = torch.arange(hidden.size(0), device=hidden.device)
        return hidden[rows, lengths - 1]
    if kind == "first":
        return hidden[:, 0]
    if kind == "mean":
        mask = (torch.arange(hidden.size(1), device=hidden.device)[None, :] < lengths[:, None])
        mask = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    raise ConfigError(f"pooling must be one of {POOLINGS}, got {kind!r}")


class ClassificationHead(nn.Module):
    """Pooled hidden state -> class logits through one bias-free linear layer, named ``score``
    as in Hugging Face's sequence classifiers (so exports and PEFT adapters line up)."""

    def __init__(self, d_model: int, n_classes: int, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS or pooling == "auto":
            raise ConfigError(f"pooling must be one of {POOLINGS[1:]}, got {pooling!r}")
        if n_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.pooling = pooling
        self.score = Linear(d_model, n_classes, bias=False)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.score(pool(hidden, lengths, self.pooling))


class Classifier(nn.Module):
    """A :class:`~zenlm.model.Transformer` with a classification head instead of the LM head.

    ``labels`` names the classes in logit order. The backbone's LM head is not used (and is
    frozen, so an untied one takes no optimizer state and no DDP gradient sync).
    """

    def __init__(self, backbone: nn.Module, labels: list[str], pooling: str = "auto",
                 init_std: float | None = None):
        super().__init__()
        if pooling == "auto":
            pooling = "last" if backbone.config.causal else "mean"
        self.backbone = backbone
        self.labels = [str(label) for label in labels]
        self.head = ClassificationHead(backbone.config.d_model, len(self.labels), pooling)
        p = backbone.tok_emb.weight
        self.head.to(device=p.device, dtype=p.dtype)
        std = init_std if init_std is not None else backbone.config.init_std
        nn.init.normal_(self.head.score.weight, mean=0.0, std=std)
        if getattr(backbone, "lm_head", None) is not None:
            backbone.lm_head.requires_grad_(False)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C) for right-padded token rows ``idx`` (B, T) of ``lengths``."""
        return self.head(self.backbone.hidden_states(idx), lengths)


__all__ = ["Classifier", "ClassificationHead", "pool", "POOLINGS"]
