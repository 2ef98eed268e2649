"""Task heads over :meth:`Transformer.hidden_states`: sequence classification, sentence
embeddings, and the two BERT heads a backbone can carry (masked-LM transform, pooler).

A head reads the final-norm hidden states, pools one vector per sequence and maps it to class
logits. How to pool is a switch, because it depends on who can see what:

- ``last``: the last non-padding token. In a causal decoder that is the only position that has
  seen the whole text, and right padding after it cannot change it (causal attention never
  looks ahead), so padded batches need no attention mask. Hugging Face's
  ``*ForSequenceClassification`` decoders pool the same token.
- ``first``: position 0, the ``[CLS]`` token of BERT-style encoders.
- ``mean``: the mean over non-padding positions (sentence-embedding encoders).

- ``pooler``: BERT's pooler (dense + tanh on ``[CLS]``), what its sequence classifiers read.

``auto`` picks ``last`` for causal models and ``mean`` for encoders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zenlm.errors import ConfigError
from zenlm.model.linear import Linear

POOLINGS = ("auto", "last", "first", "mean", "pooler")


class MaskedLMHead(nn.Module):
    """BERT's prediction head before the (tied) decoder: dense -> GELU -> LayerNorm, and the
    decoder's output bias. The transform gives the MLM its own space for predicting words, so
    the tied embeddings need not double as the last layer's features."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.d_model, config.d_model, bias=True)
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.approximate = "tanh" if config.mlp == "gelu" else "none"

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h), approximate=self.approximate))


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the first (``[CLS]``) position."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.d_model, config.d_model, bias=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


def padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool mask of the real tokens of right-padded rows of ``lengths``."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def sentence_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor, kind: str = "mean",
                       normalize: bool = True) -> torch.Tensor:
    """(B, d) sentence vectors from hidden states (B, T, d): the mean over real tokens (as
    sentence-transformers pools) or the ``[CLS]`` state, L2-normalised so a dot product is a
    cosine."""
    if kind == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    elif kind in ("first", "cls"):
        vec = hidden[:, 0]
    else:
        raise ConfigError(f"sentence pooling must be mean or cls, got {kind!r}")
    return F.normalize(vec, p=2, dim=-1) if normalize else vec


def pool(hidden: torch.Tensor, lengths: torch.Tensor, kind: str) -> torch.Tensor:
    """One vector per row of ``hidden`` (B, T, d); row i holds ``lengths[i]`` real tokens
    followed by padding."""
    if kind == "last":
        rows = torch.arange(hidden.size(0), device=hidden.device)
        return hidden[rows, lengths - 1]
    if kind == "first":
        return hidden[:, 0]
    if kind == "mean":
        mask = padding_mask(lengths, hidden.size(1)).to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    raise ConfigError(f"pooling must be one of {POOLINGS}, got {kind!r}")


class ClassificationHead(nn.Module):
    """Pooled hidden state -> class logits through one bias-free linear layer, named ``score``
    as in Hugging Face's sequence classifiers (so exports and PEFT adapters line up)."""

    def __init__(self, d_model: int, n_classes: int, pooling: str = "last", bias: bool = False):
        super().__init__()
        if pooling not in POOLINGS or pooling == "auto":
            raise ConfigError(f"pooling must be one of {POOLINGS[1:]}, got {pooling!r}")
        if n_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.pooling = pooling
        self.score = Linear(d_model, n_classes, bias=bias)
        self.pooler: Pooler | None = None  # the backbone's, set by Classifier for "pooler"

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.pooling == "pooler":
            return self.score(self.pooler(hidden))
        return self.score(pool(hidden, lengths, self.pooling))


class Classifier(nn.Module):
    """A :class:`~zenlm.model.Transformer` with a classification head instead of the LM head.

    ``labels`` names the classes in logit order. The backbone's LM head is not used (and is
    frozen, so an untied one takes no optimizer state and no DDP gradient sync).
    """

    def __init__(self, backbone: nn.Module, labels: list[str], pooling: str = "auto",
                 init_std: float | None = None, bias: bool = False):
        super().__init__()
        if pooling == "auto":
            pooling = "last" if backbone.config.causal else "mean"
        if pooling == "pooler" and getattr(backbone, "pooler", None) is None:
            raise ConfigError("pooling=pooler needs a backbone with BERT's pooler (model.pooler)")
        self.backbone = backbone
        self.labels = [str(label) for label in labels]
        self.head = ClassificationHead(backbone.config.d_model, len(self.labels), pooling, bias=bias)
        if pooling == "pooler":
            object.__setattr__(self.head, "pooler", backbone.pooler)  # shared, not a second copy
        p = backbone.tok_emb.weight
        self.head.to(device=p.device, dtype=p.dtype)
        std = init_std if init_std is not None else backbone.config.init_std
        nn.init.normal_(self.head.score.weight, mean=0.0, std=std)
        for name in ("lm_head", "mlm_head"):  # unused by a classifier
            if getattr(backbone, name, None) is not None:
                getattr(backbone, name).requires_grad_(False)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, C) for right-padded token rows ``idx`` (B, T) of ``lengths``.

        A causal backbone needs no mask (right padding comes after every real token), but a
        bidirectional one would attend to the padding from every position: it gets one."""
        mask = None
        if not self.backbone.config.causal:
            mask = padding_mask(lengths, idx.size(1)).long()
        hidden = self.backbone.hidden_states(idx, attention_mask=mask, token_type_ids=token_type_ids)
        return self.head(hidden, lengths)


__all__ = ["Classifier", "ClassificationHead", "MaskedLMHead", "Pooler", "padding_mask",
           "pool", "sentence_embedding", "POOLINGS"]
