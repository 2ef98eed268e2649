"""Text generation with a KV cache: prefill the prompt once, then one token per forward.

:func:`stream` yields the text of one completion as it becomes final (holding back the bytes of
an unfinished character and text that might be the start of a stop string); :func:`generate`
joins it; :func:`generate_batch` completes prompts of different lengths together, one forward
a step for the whole batch, which is where a CPU gets most of its decoding throughput.
:func:`prefill_row` and :func:`decode_rows` are the steps of that loop, over a KV cache with a
length per row; the continuous-batching engine (``infer/engine.py``) runs the same two.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from zenlm.errors import PromptError, PromptTooLongError
from zenlm.infer.sampling import SamplingConfig, sample_next


def encode_prompt(tokenizer, prompt: str | list[int], context: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode_prompt(prompt)  # with the BOS where the model expects one
    else:
        ids = list(prompt)
    if not ids:
        raise PromptError("the prompt is empty and this tokenizer adds no BOS token to start from")
    if len(ids) >= context:
        raise PromptTooLongError(f"the prompt is {len(ids)} tokens; the model's context is {context} "
                                 f"tokens and generation needs at least one free position")
    return ids


class RowText:
    """One completion's text: decodes tokens, finds stop strings, says what is final."""

    def __init__(self, tokenizer, cfg: SamplingConfig):
        self.decoder = tokenizer.stream_decode()
        self.stops = cfg.stop
        self.eot = tokenizer.eot_id if cfg.stop_at_eot else None
        self.text, self.emitted, self.done = "", 0, False

    def _held_back(self) -> int:
        """How many trailing characters could still grow into a stop string."""
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        return keep

    def push(self, token: int) -> str:
        """Newly final text after ``token`` (sets ``done`` at EOS or a stop string)."""
        if self.done:
            return ""
        if token == self.eot:
            self.done = True
            return self.finish()
        self.text += self.decoder.push(token)
        start = self.emitted
        hits = [i for i in (self.text.find(s, max(0, start - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.done = True
            self.text = self.text[:min(hits)]
            self.emitted = len(self.text)
            return self.text[start:]
        safe = len(self.text) - self._held_back()
        if safe > start:
            self.emitted = safe
            return self.text[start:safe]
        return ""

    def finish(self) -> str:
        """Whatever was held back, once no more tokens will come."""
        if not self.done or self.emitted < len(self.text):
            self.text += self.decoder.flush()
            hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
        self.done = True
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece


def compile_decoding(model, **compile_kwargs) -> None:
    """Decode through ``torch.compile``: fused elementwise kernels and less Python per token.

    Only the one-token step is compiled (prefill stays eager: it runs once and is GEMM-bound).
    Shapes are dynamic because the cache grows a position per step, so the step compiles
    once or twice (the first call and the first change of length), not once per token.
    On a small CPU compiling takes far longer than a reply and decoding is no faster
    (inductor's dynamic-shape kernels lose to oneDNN's products, and batches lose most), so it
    stays off by default; it is here for accelerators, where removing per-token Python matters
    more.
    """
    from zenlm.model.kv_cache import keep_plan_eager

    keep_plan_eager()
    compile_kwargs.setdefault("dynamic", True)
    model.decode_forward = torch.compile(model.forward, **compile_kwargs)


def prefill_row(model, cache, slot: int, ids: list[int], start: int = 0,
                chunk: int | None = None) -> torch.Tensor:
    """Feed ``ids[start:]`` into ``slot`` of a per-row cache whose row holds ``start`` positions,
    ``chunk`` tokens a forward; the last position's logits (1, V). Shared with the engine."""
    device = model.tok_emb.weight.device
    chunk = chunk or len(ids)
    logits = None
    while start < len(ids):
        n = min(chunk, len(ids) - start)
        view = cache.rows(slot, 1, [start])
        logits = model(torch.tensor([ids[start:start + n]], device=device), cache=view, last_only=True)[:, -1]
        start = view.lengths[0]
        cache.lengths[slot] = start
    return logits


def decode_rows(forward, cache, tokens: torch.Tensor, live: list[bool] | None = None) -> torch.Tensor:
    """One token (B, 1) for rows 0..B of a per-row cache, each at its own length, in one forward;
    rows not ``live`` sit it out. Logits (B, V). Shared with the engine."""
    b = tokens.shape[0]
    view = cache.rows(0, b, cache.lengths[:b], live)
    logits = forward(tokens, cache=view, last_only=True)[:, -1]
    cache.lengths[:b] = view.lengths
    return logits


@torch.inference_mode()  # not only no_grad: no version counters or views tracked, fewer steps per op
def token_steps(model, rows: list[list[int]], cfg: SamplingConfig) -> Iterator[torch.Tensor]:
    """Next-token ids (B,) at every step, for prompts of any lengths, decoded together.

    The caller decides when to stop (EOS, stop strings); the step budget here is
    ``cfg.max_new_tokens`` or what the context leaves, whichever is smaller. The KV cache has
    one row per prompt at its own length (prompts of one length prefill together, others one by
    one), and every step is one forward for all rows: the engine's decode step
    (:func:`decode_rows`), with one settings and one random stream for the whole batch.
    """
    model.eval()
    device = model.tok_emb.weight.device
    longest = max(len(r) for r in rows)
    budget = min(cfg.max_new_tokens, model.config.max_seq_len - longest)
    if budget <= 0:
        return
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed)
    cache = model.new_cache(len(rows), longest + budget, per_row=True)
    step_forward = getattr(model, "decode_forward", model)  # see compile_decoding
    if all(len(r) == longest for r in rows):  # one forward for the whole batch
        logits = model(torch.tensor(rows, device=device), cache=cache, last_only=True)[:, -1]
    else:
        logits = torch.cat([prefill_row(model, cache, i, r) for i, r in enumerate(rows)])
    seen = None
    if cfg.repetition_penalty != 1.0:  # left-padded with each row's first token: harmless here
        seen = torch.tensor([[r[0]] * (longest - len(r)) + r for r in rows], device=device)
    made = [[] for _ in rows] if cfg.allowed is not None else None
    for step in range(budget):
        nxt = sample_next(logits, cfg, seen, gen, made)
        yield nxt
        if made is not None:
            for r, t in zip(made, nxt.tolist()):
                r.append(t)
        if step == budget - 1:
            break
        if seen is not None:
            seen = torch.cat([seen, nxt[:, None]], dim=1)
        logits = decode_rows(step_forward, cache, nxt[:, None])


def stream(model, tokenizer, prompt: str | list[int], cfg: SamplingConfig | None = None,
           **overrides) -> Iterator[str]:
    """Text pieces of the completion as they become final.

    The prompt is checked here, before the first piece is asked for, so a caller learns of a
    prompt that does not fit before it prints anything.
    """
    cfg = cfg or SamplingConfig(**overrides)
    ids = encode_prompt(tokenizer, prompt, model.config.max_seq_len)
    return _stream(model, tokenizer, ids, cfg)


def _stream(model, tokenizer, ids: list[int], cfg: SamplingConfig) -> Iterator[str]:
    row = RowText(tokenizer, cfg)
    for nxt in token_steps(model, [ids], cfg):
        piece = row.push(int(nxt[0]))
        if piece:
            yield piece
        if row.done:
            return
    piece = row.finish()
    if piece:
        yield piece


def generate(model, tokenizer, prompt: str | list[int], cfg: SamplingConfig | None = None, **overrides) -> str:
    """The completion of ``prompt`` as one string (the prompt itself not included)."""
    return "".join(stream(model, tokenizer, prompt, cfg, **overrides))


def generate_batch(model, tokenizer, prompts: list[str | list[int]], cfg: SamplingConfig | None = None,
                   **overrides) -> list[str]:
    """Completions of several prompts at once (same sampling settings, one shared KV cache).

    With a seed, a batch is reproducible, but a row's sample differs from the same prompt run
    alone (the random draws are shared across the batch); greedy rows equal their solo runs.
    """
    cfg = cfg or SamplingConfig(**overrides)
    rows = [encode_prompt(tokenizer, p, model.config.max_seq_len) for p in prompts]
    texts = [RowText(tokenizer, cfg) for _ in rows]
    for nxt in token_steps(model, rows, cfg):
        for row, token in zip(texts, nxt.tolist()):
            row.push(token)
        if all(r.done for r in texts):
            break
    for row in texts:
        row.finish()
    return [r.text for r in texts]
