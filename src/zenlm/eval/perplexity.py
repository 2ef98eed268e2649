"""Loss, perplexity and bits-per-byte.

Bits-per-byte divides the summed loss (in bits) by the number of UTF-8 bytes the predicted
tokens stand for, so models with different tokenizers can be compared on the same text.
Special tokens stand for no bytes and are left out of both sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EvalResult:
    loss: float  # mean nats per predicted token
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bpb": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes}


@torch.no_grad()
def evaluate_batches(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     token_bytes: np.ndarray | torch.Tensor, device: str = "cpu") -> EvalResult:
    was_training = model.training
    model.eval()
    tb = torch.as_tensor(token_bytes, dtype=torch.int64, device=device)
    nats = torch.zeros((), dtype=torch.float64)
    nats_counted = torch.zeros((), dtype=torch.float64)
    n_tok = 0
    n_bytes = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        loss = model(x, y, reduction="none").double()
        valid = y != -100
        yb = tb[y.clamp(min=0)] * valid
        nats += loss[valid].sum().cpu()
        nats_counted += loss[yb > 0].sum().cpu()
        n_tok += int(valid.sum())
        n_bytes += int(yb.sum())
    if was_training:
        model.train()
    mean = float(nats) / max(n_tok, 1)
    bpb = float(nats_counted) / (math.log(2) * max(n_bytes, 1))
    return EvalResult(mean, math.exp(min(mean, 50.0)), bpb, n_tok, n_bytes)


def text_windows(ids: list[int], seq_len: int, batch: int):
    """Non-overlapping windows over one token stream; the last one is shorter, not dropped."""
    t = torch.tensor(ids, dtype=torch.int64)
    rows = []
    for s in range(0, len(t) - 1, seq_len):
        chunk = t[s:s + seq_len + 1]
        x, y = chunk[:-1], chunk[1:]
        rows.append((x, y))
    for i in range(0, len(rows), batch):
        group = rows[i:i + batch]
        width = max(len(x) for x, _ in group)
        xs = torch.zeros(len(group), width, dtype=torch.int64)
        ys = torch.full((len(group), width), -100, dtype=torch.int64)
        for j, (x, y) in enumerate(group):
            xs[j, :len(x)] = x
            ys[j, :len(y)] = y
        yield xs, ys


def evaluate_text(model, tokenizer, text: str, *, seq_len: int | None = None, batch: int = 8,
                  device: str = "cpu") -> EvalResult:
    """Loss, perplexity and bits-per-byte of a text, scored in context-length windows."""
    from zenlm.errors import DataError

    if not text.strip():
        raise DataError("the text to evaluate is empty")
    ids = tokenizer.encode_prompt(text)  # a document starts with the BOS where the model has one
    if len(ids) < 2:
        raise DataError("the text to evaluate is shorter than two tokens")
    seq_len = seq_len or model.config.max_seq_len
    return evaluate_batches(model, text_windows(ids, seq_len, batch), tokenizer.token_byte_lengths(), device)
