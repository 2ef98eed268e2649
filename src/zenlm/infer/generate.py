"""Text generation with a KV cache: prefill the prompt once, then one token per forward.

:func:`stream` yields text pieces as they become final (holding back bytes of an unfinished
character and text that might be the start of a stop string); :func:`generate` joins them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from zenlm.errors import PromptTooLongError
from zenlm.infer.sampling import SamplingConfig, sample_next


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still grow into a stop string."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


def encode_prompt(tokenizer, prompt: str | list[int], context: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode_prompt(prompt)  # with the BOS where the model expects one
    else:
        ids = list(prompt)
    if len(ids) >= context:
        raise PromptTooLongError(f"the prompt is {len(ids)} tokens; the model's context is {context} "
                                 f"tokens and generation needs at least one free position")
    return ids


def stream(model, tokenizer, prompt: str | list[int], cfg: SamplingConfig | None = None,
           **overrides) -> Iterator[str]:
    """Text pieces of the completion as they become final.

    The prompt is checked here, before the first piece is asked for, so a caller learns of a
    prompt that does not fit before it prints anything.
    """
    cfg = cfg or SamplingConfig(**overrides)
    ids = encode_prompt(tokenizer, prompt, model.config.max_seq_len)
    return _stream(model, tokenizer, ids, cfg)


@torch.no_grad()
def _stream(model, tokenizer, ids: list[int], cfg: SamplingConfig) -> Iterator[str]:
    model.eval()
    device = model.tok_emb.weight.device
    context = model.config.max_seq_len
    budget = min(cfg.max_new_tokens, context - len(ids))
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed)
    cache = model.new_cache(1, len(ids) + budget)
    seen = torch.tensor([ids], device=device)
    logits = model(seen, cache=cache, last_only=True)[:, -1]
    decoder = tokenizer.stream_decode()
    text, emitted = "", 0
    for _ in range(budget):
        nxt = sample_next(logits, cfg, seen if cfg.repetition_penalty != 1.0 else None, gen)
        token = int(nxt)
        if cfg.stop_at_eot and token == tokenizer.eot_id:
            break
        text += decoder.push(token)
        hit = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in cfg.stop) if i >= 0), default=-1)
        if hit >= 0:
            if hit > emitted:
                yield text[emitted:hit]
            return
        safe = len(text) - _held_back(text, cfg.stop)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
        if cache.pos >= cache.max_len:
            break
        seen = torch.cat([seen, nxt.view(1, 1)], dim=1)
        logits = model(nxt.view(1, 1), cache=cache, last_only=True)[:, -1]
    text += decoder.flush()
    if len(text) > emitted:
        yield text[emitted:]


def generate(model, tokenizer, prompt: str | list[int], cfg: SamplingConfig | None = None, **overrides) -> str:
    """The completion of ``prompt`` as one string (the prompt itself not included)."""
    return "".join(stream(model, tokenizer, prompt, cfg, **overrides))
