"""Decoding an encoder-decoder: greedy, sampling and beam search over one step function.

:class:`DecoderStep` encodes a batch of sources once and then gives the next-token
log-probabilities of every row, one token per call, through the decoder's KV cache; the
cross-attention keys and values are projected from the encoder output on the first step and
kept in the cache. Greedy and sampling pick one token per row from it (``sampling.sample_next``,
the picker ``zenlm generate`` uses), beam search keeps ``beam`` rows per source and reorders
the cache to follow the survivors.

Length penalty: GNMT's (Wu et al. 2016), a finished hypothesis scores
``log p / ((5 + len) / 6) ** alpha``, ``len`` counting its tokens with the end token; alpha 0
is the plain sum of log-probabilities. Every source has its own length limit
(``max_len_a * len(source) + max_len_b``, under the model's context), so the output of a
sentence does not depend on what else is in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zenlm.errors import ConfigError
from zenlm.infer.sampling import SamplingConfig, sample_next


@dataclass
class DecodeConfig:
    beam: int = 1  # 1: greedy (or sampling with temperature > 0)
    length_penalty: float = 0.6  # GNMT's alpha
    max_len_a: float = 1.5  # a source of n tokens gets at most a*n + b target tokens
    max_len_b: int = 10
    temperature: float = 0.0  # > 0 with beam 1: sampling
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.beam < 1:
            raise ConfigError(f"beam must be at least 1, got {self.beam}")
        if self.beam > 1 and self.temperature > 0:
            raise ConfigError("sampling (temperature > 0) goes with beam 1")
        if self.length_penalty < 0:
            raise ConfigError(f"length penalty must be >= 0, got {self.length_penalty}")


def gnmt_penalty(length: torch.Tensor | int, alpha: float) -> torch.Tensor | float:
    return ((5.0 + length) / 6.0) ** alpha


class DecoderStep:
    """Encode ``src`` once; each call feeds one token per row and returns log-probs (N, V).

    ``rows_per_source`` > 1 (beam search): that many decoder rows per source, rows of one
    source next to each other. The encoding is not repeated: cross-attention reads each
    source's keys and values once for all its rows (``Attention._grouped_cross``)."""

    def __init__(self, model, src: torch.Tensor, src_mask: torch.Tensor, max_len: int, *,
                 rows_per_source: int = 1, pad_id: int | None = None):
        self.model = model
        self.memory, self.src_mask = model.encode(src, src_mask), src_mask
        self.cache = model.new_cache(src.shape[0] * rows_per_source, max_len)
        self.pad_id = pad_id

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model.decode(tokens[:, None], self.memory, self.src_mask, self.cache)[:, -1].float()
        if self.pad_id is not None:
            logits[:, self.pad_id] = float("-inf")  # padding is never a translation
        return logits.log_softmax(-1)

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)


def _limits(model, src_mask: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """Each source's most target tokens (its end token included)."""
    n = src_mask.sum(-1).float()
    cap = model.config.max_seq_len - 1
    return (n * cfg.max_len_a + cfg.max_len_b).long().clamp(min=1, max=cap)


@torch.no_grad()
def decode(model, src: torch.Tensor, src_mask: torch.Tensor, *, bos_id: int, eos_id: int,
           pad_id: int | None = None, cfg: DecodeConfig | None = None) -> list[list[int]]:
    """Target tokens of each source (without start and end tokens): beam search for
    ``cfg.beam`` > 1, else greedy or sampling."""
    cfg = cfg or DecodeConfig()
    if cfg.beam > 1:
        return beam_search(model, src, src_mask, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, cfg=cfg)
    return greedy(model, src, src_mask, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, cfg=cfg)


@torch.no_grad()
def greedy(model, src: torch.Tensor, src_mask: torch.Tensor, *, bos_id: int, eos_id: int,
           pad_id: int | None = None, cfg: DecodeConfig | None = None) -> list[list[int]]:
    """One token per row per step: the most likely (temperature 0) or a sample."""
    cfg = cfg or DecodeConfig()
    limits = _limits(model, src_mask, cfg)
    steps = int(limits.max())
    step = DecoderStep(model, src, src_mask, steps + 1, pad_id=pad_id)
    pick = SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device=src.device)
        gen.manual_seed(cfg.seed)
    b = src.shape[0]
    tokens = torch.full((b,), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    out = []
    for t in range(steps):
        logp = step(tokens)
        nxt = sample_next(logp, pick, generator=gen)
        nxt = torch.where(done | (t + 1 >= limits), torch.full_like(nxt, eos_id), nxt)
        out.append(nxt)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        tokens = nxt
    rows = torch.stack(out, 1).tolist()
    return [r[: r.index(eos_id)] if eos_id in r else r for r in rows]


@torch.no_grad()
def beam_search(model, src: torch.Tensor, src_mask: torch.Tensor, *, bos_id: int, eos_id: int,
                pad_id: int | None = None, cfg: DecodeConfig | None = None) -> list[list[int]]:
    """Batched beam search: ``cfg.beam`` live hypotheses per source, the best finished one
    returned under GNMT's length penalty.

    Each step ranks the 2k best extensions of a source's k hypotheses. Those ending in the end
    token (among the first k) join the source's finished list (the best k kept, scored with the
    length penalty); the best k others live on. A source is done when it has k finished
    hypotheses and its best live one, normalised at the current length, scores no better than
    the worst of them (transformers' default stopping rule), or when it reaches its limit.
    """
    cfg = cfg or DecodeConfig()
    k, alpha = cfg.beam, cfg.length_penalty
    dev = src.device
    b = src.shape[0]
    limits = _limits(model, src_mask, cfg)  # (B,)
    steps = int(limits.max())
    step = DecoderStep(model, src, src_mask, steps + 1, rows_per_source=k, pad_id=pad_id)
    neg = float("-inf")
    scores = torch.full((b, k), neg, device=dev)
    scores[:, 0] = 0.0  # one live hypothesis at first: the others would only repeat it
    seqs = torch.full((b, k, steps), eos_id, dtype=torch.long, device=dev)
    fin_scores = torch.full((b, k), neg, device=dev)
    fin_seqs = torch.full((b, k, steps), eos_id, dtype=torch.long, device=dev)
    fin_lens = torch.zeros((b, k), dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    tokens = torch.full((b * k,), bos_id, dtype=torch.long, device=dev)
    base = (torch.arange(b, device=dev) * k)[:, None]
    for t in range(steps):
        logp = step(tokens).view(b, k, -1)
        vocab = logp.shape[-1]
        at_limit = (t + 1 >= limits)[:, None]  # (B, 1): only the end token may come next
        if bool(at_limit.any()):
            only_eos = torch.full_like(logp, neg)
            only_eos[..., eos_id] = logp[..., eos_id]
            logp = torch.where(at_limit[:, :, None], only_eos, logp)
        cand = (scores[:, :, None] + logp).view(b, k * vocab)
        top, idx = cand.topk(min(2 * k, k * vocab), dim=1)  # (B, 2k), best first
        beam_of, token = idx // vocab, idx % vocab
        ended = token == eos_id
        # finished: end-token candidates among the first k, scored with the length penalty
        rank = torch.arange(top.shape[1], device=dev)[None, :]
        new_fin = torch.where(ended & (rank < k) & ~done[:, None] & (top > neg),
                              top / gnmt_penalty(t + 1, alpha), torch.full_like(top, neg))
        if bool((new_fin > neg).any()):
            cand_seqs = seqs.gather(1, beam_of[:, :, None].expand(-1, -1, steps)).clone()
            cand_seqs[:, :, t] = eos_id
            all_scores = torch.cat([fin_scores, new_fin], 1)
            keep = all_scores.topk(k, dim=1).indices
            fin_scores = all_scores.gather(1, keep)
            all_seqs = torch.cat([fin_seqs, cand_seqs], 1)
            fin_seqs = all_seqs.gather(1, keep[:, :, None].expand(-1, -1, steps))
            all_lens = torch.cat([fin_lens, torch.full_like(new_fin, t + 1, dtype=torch.long)], 1)
            fin_lens = all_lens.gather(1, keep)
        # live: the best k candidates that did not end
        live_top = torch.where(ended, torch.full_like(top, neg), top)
        live_scores, live_pick = live_top.topk(k, dim=1)
        live_beam = beam_of.gather(1, live_pick)
        live_token = token.gather(1, live_pick)
        seqs = seqs.gather(1, live_beam[:, :, None].expand(-1, -1, steps)).clone()
        seqs[:, :, t] = live_token
        scores = live_scores
        full = fin_scores[:, -1] > neg  # k finished
        best_live = scores[:, 0] / gnmt_penalty(t + 1, alpha)
        done |= (full & (best_live <= fin_scores[:, -1])) | (t + 1 >= limits) | (scores[:, 0] == neg)
        if bool(done.all()):
            break
        step.reorder((base + live_beam).view(-1))
        tokens = live_token.reshape(-1)
    out = []
    for i in range(b):
        j = int(fin_scores[i].argmax())
        if fin_scores[i, j] == neg:  # nothing finished: the best live hypothesis, unended
            out.append(seqs[i, 0, : int(limits[i])].tolist())
        else:
            out.append(fin_seqs[i, j, : int(fin_lens[i, j]) - 1].tolist())
    return out


def translate(model, tokenizer, texts: list[str], *, cfg: DecodeConfig | None = None,
              batch_size: int = 64, pad_id: int | None = None) -> list[str]:
    """Detokenised translations of ``texts``, decoded in batches of similar length (less
    padding), returned in the input order."""
    from zenlm.data.pairs import PAD, collate_pairs

    cfg = cfg or DecodeConfig()
    eos = tokenizer.eot_id
    if eos is None:
        raise ConfigError("the tokenizer has no end token to end a translation with")
    if pad_id is None:
        pad_id = tokenizer.hf.token_to_id(PAD)
    cap = model.config.max_seq_len
    ids = [tokenizer.encode(t)[: cap - 1] + [eos] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    dev = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        src, mask, _, _ = collate_pairs([ids[i] for i in chunk], [[] for _ in chunk], eos,
                                        eos if pad_id is None else pad_id)
        hyps = decode(model, src.to(dev), mask.to(dev), bos_id=eos, eos_id=eos, pad_id=pad_id, cfg=cfg)
        for i, h in zip(chunk, hyps):
            out[i] = tokenizer.decode(h, skip_special_tokens=True).strip()
    return out


__all__ = ["DecodeConfig", "DecoderStep", "decode", "greedy", "beam_search", "translate", "gnmt_penalty"]
