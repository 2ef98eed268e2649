"""Masked-token prediction: what a masked-LM encoder puts at each mask token of a text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zenlm.errors import ConfigError, TokenizerError


@dataclass(frozen=True)
class Fill:
    """One candidate for one mask: the token, its id, its probability, the text with it in."""

    token: str
    token_id: int
    prob: float
    text: str


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, k: int = 5) -> list[list[Fill]]:
    """The ``k`` likeliest tokens at each mask token of ``text``, one list per mask in order
    (each candidate's ``text`` fills that mask alone and leaves any others)."""
    if getattr(model, "mlm_head", None) is None or model.config.causal:
        raise ConfigError("fill-mask needs an encoder with a masked-LM head (BertForMaskedLM, "
                          "or a run of an encoder recipe such as recipes/bert-tiny.yaml)")
    mask = tokenizer.mask_token
    if mask is None or tokenizer.mask_id is None:
        raise TokenizerError("this tokenizer has no mask token")
    if mask not in text:
        raise ConfigError(f"the text has no {mask} to fill")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    (ids, types), = tokenizer.encode_inputs([text], max_length=model.config.max_seq_len)
    x = torch.tensor([ids], device=model.tok_emb.weight.device)
    tt = torch.tensor([types], device=x.device)
    logits = model(x, token_type_ids=tt)[0].float()
    where = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
    out = []
    for n, pos in enumerate(where):
        probs = logits[pos].softmax(-1)
        top = probs.topk(min(k, probs.numel()))
        cands = []
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            token = tokenizer.decode([i]).strip() if i < tokenizer.vocab_size else f"<{i}>"
            cands.append(Fill(token, i, p, _fill_nth(text, mask, n, token)))
        out.append(cands)
    return out


def _fill_nth(text: str, mask: str, n: int, token: str) -> str:
    parts = text.split(mask)
    return mask.join(parts[:n + 1]) + token + mask.join(parts[n + 1:]) if len(parts) > n + 1 else text


__all__ = ["Fill", "fill_mask"]
