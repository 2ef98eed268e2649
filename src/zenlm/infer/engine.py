"""A continuous-batching decode engine: requests join and leave one running batch between steps.

A server's clients do not arrive together, so a batch fixed at the start (``generate_batch``)
would make a new request wait for the slowest of the running ones. Here the KV cache has one
slot per row, each at its own length (:meth:`KVCache.rows`), and every step of the engine
thread does, in order:

1. the work handed in with :meth:`Engine.call` (embeddings, prompt scoring), so it never races
   the decode;
2. cancelled rows leave (their slot is free for the next request);
3. new requests leave the queue as slots free up, and this step's prompt chunks are chosen,
   the oldest prompt's first: up to ``prefill_chunk`` tokens through the model's forward, so a
   long prompt spreads over several steps instead of stalling the streams already running;
4. one forward of one token for every decoding row, however many there are: on a CPU this is
   what buys throughput, since the weights are read once per step for the whole batch. Where
   the native step runs (``infer/fused.py``), prompts of up to ``native_prompt`` tokens go
   into this same step, ``native_chunk`` tokens of them a step, as extra rows at successive
   positions of their slot: a joining prompt then costs the running streams a few rows of
   their step instead of a forward of its own between two of their tokens (the time between
   tokens that a server's clients see). Those rows are computed exactly as one token a step
   would be, so a prompt's logits do not depend on its chunking or on its company.

Each row samples with its own settings and its own ``torch.Generator``, so a seeded request
gives the same text alone or batched, and greedy rows equal their solo runs.

A finished row's KV stays in its slot until the slot is taken. A new prompt that starts with
the tokens of any slot (a conversation's earlier turns, a shared system prompt) takes that
slot as it is, or copies the prefix from a running row, and prefills only the rest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from uuid import uuid4

import torch

from zenlm.errors import PromptTooLongError, ZenlmError
from zenlm.infer.generate import RowText, decode_rows, encode_prompt, prefill_row
from zenlm.infer.sampling import SamplingConfig, sample_next

log = logging.getLogger(__name__)


class QueueFull(ZenlmError):
    """The engine's queue of waiting requests is full: try again shortly."""

    retry_after = 1  # seconds: a server's Retry-After


class EngineStopped(ZenlmError):
    """The engine is shutting down (or has stopped) and takes no new requests."""


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the top k
    id: str = field(default_factory=lambda: uuid4().hex)


@dataclass
class TokenEvent:
    """One generated token; the last event of a request carries its ``finish_reason``."""

    token: int | None  # None only on a final event that carries no token (cancelled)
    text: str  # newly final text (held back while it could be the start of a stop string)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    time: float = 0.0  # time.monotonic() when the event was made: for TTFT / TBT


class Handle:
    """A submitted request: iterate it (threads or asyncio) for its events, cancel it."""

    def __init__(self, req: Request, prompt_tokens: int):
        self.id = req.id
        self.request = req
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.reused_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.submitted = time.monotonic()
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._events: list[TokenEvent] = []
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._engine: Engine | None = None

    def cancel(self) -> None:
        """Free the row at the engine's next step (a client that went away)."""
        self.cancelled = True
        if self._engine is not None:
            self._engine._poke()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            self._events.append(event)
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
            self._cond.notify_all()
            for loop, flag in self._waiters:
                loop.call_soon_threadsafe(flag.set)

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events):
                    self._cond.wait()
                event = self._events[i]
            i += 1
            yield event
            if event.finish_reason is not None:
                return

    async def _aiter(self):
        loop, flag = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._waiters.append((loop, flag))
        i = 0
        try:
            while True:
                with self._cond:  # cleared under the lock: a push after this sets it again
                    batch = self._events[i:]
                    if not batch:
                        flag.clear()
                if not batch:
                    await flag.wait()
                    continue
                for event in batch:
                    i += 1
                    yield event
                    if event.finish_reason is not None:
                        return
        finally:
            with self._cond:
                self._waiters.remove((loop, flag))

    def __aiter__(self):
        return self._aiter()

    def text(self) -> str:
        """Block until the request ends; its whole text."""
        return "".join(e.text for e in self)

    def events(self) -> list[TokenEvent]:
        """Block until the request ends; all its events."""
        return list(self)


class _Row:
    """A request in a slot: its sequence so far, sampling state and text."""

    def __init__(self, handle: Handle, tokenizer, budget: int):
        req = handle.request
        self.handle, self.cfg, self.logprobs = handle, req.sampling, req.logprobs
        self.prompt = list(req.prompt_ids)
        self.seq = list(self.prompt)  # the tokens whose keys are (or will be) in the slot
        self.budget = budget
        self.generated = 0
        self.pending: int | None = None  # the last sampled token, fed at the next decode step
        self.native = False  # whether its prompt goes through the native step (Engine._admit)
        self.text = RowText(tokenizer, self.cfg)
        self.gen = None
        if self.cfg.seed is not None:
            self.gen = torch.Generator()
            self.gen.manual_seed(self.cfg.seed)
        self.seen = None  # prompt + output ids for the repetition penalty, preallocated
        if self.cfg.repetition_penalty != 1.0:
            self.seen = torch.empty(len(self.prompt) + budget, dtype=torch.long)
            self.seen[:len(self.prompt)] = torch.tensor(self.prompt)
        self.n_seen = len(self.prompt)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n


class Engine:
    """Continuous batching over one model. See the module docstring for what a step does.

    ``max_batch`` rows decode together; ``max_queue`` requests may wait for a row (more raise
    :class:`QueueFull`); ``prefill_chunk`` prompt tokens are prefilled per step through the
    model's forward, or with the native step ``native_chunk`` tokens of prompts of up to
    ``native_prompt`` tokens (see the module docstring); ``max_len``
    caps a row's prompt + completion (default: the model's context). The KV cache starts small
    and doubles up to ``max_batch`` x ``max_len`` as rows need it. A prefix of at least
    ``reuse_min`` tokens is reused from the cache rather than recomputed. ``kv_dtype``: the
    cache's (default the model's; ``torch.float16`` halves its memory and what attention reads).
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int = 256, max_len: int | None = None, reuse_min: int = 4,
                 native_chunk: int = 16, native_prompt: int = 128, kv_dtype: torch.dtype | None = None):
        self.model = model
        self.body = getattr(model, "backbone", model)
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk = max(1, prefill_chunk)
        self.max_len = min(max_len or self.body.config.max_seq_len, self.body.config.max_seq_len)
        self.reuse_min = max(1, reuse_min)
        self.device = self.body.tok_emb.weight.device
        self.cache = self.body.new_cache(max_batch, min(self.max_len, 256), per_row=True, dtype=kv_dtype)
        self._forward = getattr(self.body, "decode_forward", self.body)  # see compile_decoding
        # the native step (infer/fused.py) computes prompt chunks beside the decoding rows;
        # native_chunk 0 keeps every step on the path without it (A/B)
        runs = native_chunk > 0 and getattr(self._forward, "can_run", lambda cache: False)(self.cache)
        self._native = self._forward if runs else None
        self.native_chunk, self.native_prompt = native_chunk, native_prompt
        self._rows: list[_Row | None] = [None] * max_batch
        self._tokens: list[list[int]] = [[] for _ in range(max_batch)]  # what each slot's KV holds
        self._prefilling: list[_Row] = []  # rows in a slot whose prompt is not all in the cache
        self._queue: deque[Handle] = deque()
        self._calls: deque = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._deadline = float("inf")
        self._stopped = False
        # counters for /metrics
        self.requests_total = 0
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0
        self.reused_tokens_total = 0
        self.prefill_tokens_total = 0  # prompt tokens actually computed
        self.steps_total = 0
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}

    # --- the public side (any thread) -----------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    @property
    def stats(self) -> dict:
        return {"queue_depth": self.queue_depth, "running": self.running,
                "max_batch": self.max_batch, "requests_total": self.requests_total,
                "prompt_tokens_total": self.prompt_tokens_total,
                "completion_tokens_total": self.completion_tokens_total,
                "reused_tokens_total": self.reused_tokens_total,
                "prefill_tokens_total": self.prefill_tokens_total,
                "steps_total": self.steps_total, "cache_len": self.cache.max_len,
                **{f"finished_{k}": v for k, v in self.finished.items()}}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="zenlm-engine", daemon=True)
            self._thread.start()

    def submit(self, req: Request) -> Handle:
        """Queue ``req``; raises PromptTooLongError, QueueFull or EngineStopped at once."""
        ids = encode_prompt(self.tokenizer, req.prompt_ids, self.max_len)
        req.prompt_ids = ids
        handle = Handle(req, len(ids))
        handle._engine = self
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self.requests_total += 1
            self.prompt_tokens_total += len(ids)
            if req.sampling.max_new_tokens == 0:
                self._end(handle, "length")
                return handle
            self._queue.append(handle)
            self._lock.notify_all()
        return handle

    def call(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        """Run ``fn(model, *args, **kwargs)`` in the engine thread between steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._thread is None or threading.current_thread() is self._thread:
            self._run_call(fut, fn, args, kwargs)  # no decode to race (or already in its thread)
            return fut
        with self._lock:
            if self._stopped:
                raise EngineStopped("the engine has stopped")
            self._calls.append((fut, fn, args, kwargs))
            self._lock.notify_all()
        return fut

    def prompt_logprobs(self, ids: list[int], top: int = 0) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """Each prompt token's logprob given the ones before it (the first: None), with the
        ``top`` likeliest alternatives at each position: echo scoring (lm-eval's loglikelihood)."""
        ids = list(ids)
        if not ids:
            return []
        if len(ids) > self.body.config.max_seq_len:
            raise PromptTooLongError(f"the prompt is {len(ids)} tokens; the model's context is "
                                     f"{self.body.config.max_seq_len} tokens")
        return self.call(_score_prompt, ids, top).result()

    def shutdown(self, grace: float = 30.0) -> None:
        """Refuse new requests; let the accepted ones finish within ``grace`` seconds, then
        cancel what is left and stop the thread."""
        with self._lock:
            self._stopping = True
            self._deadline = time.monotonic() + grace
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self._finish_all("cancelled")
            self._stopped = True

    def _poke(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # --- the engine thread ----------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._calls) or self.running > 0 or (
            bool(self._queue) and any(r is None for r in self._rows))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._has_work() and not self._stopping:
                    self._lock.wait(0.5)
                if self._stopping and (not self._has_work() or time.monotonic() >= self._deadline):
                    break
            try:
                self.step()
            except Exception as exc:  # a bug, or a model that cannot run: end every row, keep serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._finish_all("error", exc, queued=False)
        self._finish_all("cancelled")
        with self._lock:
            self._stopped = True
            calls, self._calls = list(self._calls), deque()
        for fut, *_ in calls:
            fut.set_exception(EngineStopped("the engine has stopped"))

    @torch.inference_mode()
    def step(self) -> None:
        """One engine step (the thread's; callable directly when no thread was started)."""
        self.steps_total += 1
        while self._calls:
            with self._lock:
                fut, fn, args, kwargs = self._calls.popleft()
            self._run_call(fut, fn, args, kwargs)
        self._reap()
        self._decode(self._prefill())

    def _run_call(self, fut, fn, args, kwargs) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            with torch.inference_mode():
                fut.set_result(fn(self.model, *args, **kwargs))
        except BaseException as exc:  # the caller gets it from the future
            fut.set_exception(exc)

    def _reap(self) -> None:
        with self._lock:
            gone = [h for h in self._queue if h.cancelled]
            for h in gone:
                self._queue.remove(h)
        for h in gone:
            self._end(h, "cancelled")
        for row in self._rows:
            if row is not None and row.handle.cancelled:
                self._free(row, "cancelled")

    def _finish_all(self, reason: str, exc: BaseException | None = None, queued: bool = True) -> None:
        for row in self._rows:
            if row is not None:
                row.handle.error = exc
                self._free(row, reason)
        if queued:
            with self._lock:
                waiting, self._queue = list(self._queue), deque()
            for h in waiting:
                self._end(h, reason)

    def _end(self, handle: Handle, reason: str, token: int | None = None, text: str = "") -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1
        handle._push(TokenEvent(token, text, finish_reason=reason, time=time.monotonic()))

    def _admit(self, batch: list) -> _Row | None:
        """The next queued request into a slot, reusing the longest cached prefix of its prompt.

        A request that shares more of its prompt with a row prefilled in this very step than
        with anything cached waits one step, and then copies that row's keys instead of
        recomputing them (a burst of requests with one system prompt)."""
        free = [s for s, r in enumerate(self._rows) if r is None]
        if not free:
            return None
        with self._lock:
            if not self._queue:
                return None
            handle = self._queue[0]
        prompt = handle.request.prompt_ids
        best, best_n = None, 0
        for s in range(self.max_batch):
            n = _common_prefix(self._tokens[s], prompt, min(self.cache.lengths[s], len(prompt) - 1))
            if n > best_n:
                best, best_n = s, n
        pending = max((_common_prefix(row.prompt, prompt, len(prompt) - 1) for row, _, _ in batch), default=0)
        if pending >= self.reuse_min and pending > best_n:
            return None
        with self._lock:
            if not self._queue or self._queue[0] is not handle:  # cancelled meanwhile
                return None
            self._queue.popleft()
        if best_n < self.reuse_min:
            best, best_n = None, 0
        slot = best if best is not None and self._rows[best] is None else free[0]
        if best is not None and best != slot:
            self.cache.copy_rows(self.cache, best, slot, 0, best_n)
        self.cache.lengths[slot] = best_n
        row = _Row(handle, self.tokenizer, min(handle.request.sampling.max_new_tokens,
                                               self.max_len - len(prompt)))
        row.slot = slot
        self._rows[slot] = row
        self._tokens[slot] = row.seq
        handle.reused_tokens = best_n
        self.reused_tokens_total += best_n
        row.native = self._native is not None and len(prompt) - best_n <= self.native_prompt
        self._prefilling.append(row)
        return row

    def _ensure(self, end: int) -> None:
        if end > self.cache.max_len:
            self.cache.grow(min(self.max_len, max(end, 2 * self.cache.max_len)))

    def _prefill(self) -> list:
        """Take this step's prompt chunks: the rows already prefilling first (oldest first),
        then new requests while slots are free. A prompt the native step takes (at most
        ``native_prompt`` tokens to compute) goes ``native_chunk`` tokens a step (all of it
        while no stream decodes) into the decode step itself, returned as (row, start, n); any
        other goes through the model's forward here, ``prefill_chunk`` tokens a step, all such
        rows in one forward. Why 128: past it torch's GEMMs compute a long fp32 prompt faster
        than the step's batch kernel (1.8x at 128 tokens on a Zen 4; int8 is faster natively
        at every length measured, to 128)."""
        # with no stream decoding nobody waits on this step: a native prompt goes in whole
        # (chunking never changes what a native row computes)
        busy = any(r is not None and r.pending is not None for r in self._rows)
        native = self.native_chunk if busy else max(self.native_chunk, self.native_prompt)
        budget = {False: self.prefill_chunk, True: native if self._native is not None else 0}
        batch, chunks = [], []

        def take(row) -> None:
            start = self.cache.lengths[row.slot]
            n = min(budget[row.native], len(row.prompt) - start)
            if n:
                budget[row.native] -= n
                (chunks if row.native else batch).append((row, start, n))

        for row in self._prefilling:
            if not any(budget.values()):
                break
            take(row)
        while any(budget.values()):
            row = self._admit(batch + chunks)
            if row is None:
                break
            take(row)
        if not batch:
            return chunks
        self._ensure(max(start + n for _, start, n in batch))
        if len(batch) == 1 or max(start for _, start, _ in batch) + max(n for _, _, n in batch) > self.max_len:
            # straight into the slots (padding to one width would run past the context)
            logits = torch.cat([prefill_row(self.body, self.cache, row.slot, row.prompt[:start + n], start)
                                for row, start, n in batch])
        else:
            logits = self._prefill_together(batch)
        self.prefill_tokens_total += sum(n for _, _, n in batch)
        self._prefilled(batch, logits)
        return chunks

    def _prefilled(self, batch: list, logits: torch.Tensor) -> None:
        """Rows of ``batch`` whose whole prompt is now cached sample their first token."""
        done = [(row, i) for i, (row, _, _) in enumerate(batch) if self.cache.lengths[row.slot] == len(row.prompt)]
        for row, _ in done:
            self._prefilling.remove(row)
        if done:
            self._choose([row for row, _ in done], logits[[i for _, i in done]])

    def _prefill_together(self, batch: list) -> torch.Tensor:
        """Several rows' prompt chunks in one forward, whatever their slots: the rows are
        gathered into a small cache of their own (right-padded to the longest chunk; padding
        lands past each row's length, where nothing reads), then their new positions are copied
        back. Copying keys is cheap next to a forward per row. Last-token logits (k, V)."""
        width = max(n for _, _, n in batch)
        stage = self.body.new_cache(len(batch), max(start for _, start, _ in batch) + width, per_row=True,
                                    dtype=self.cache.dtype)
        tokens = torch.zeros(len(batch), width, dtype=torch.long, device=self.device)
        for j, (row, start, n) in enumerate(batch):
            if start:
                stage.copy_rows(self.cache, row.slot, j, 0, start)
            tokens[j, :n] = torch.tensor(row.prompt[start:start + n])
        stage.lengths = [start for _, start, _ in batch]
        h = self.body.hidden_states(tokens, stage)
        last = torch.tensor([n - 1 for _, _, n in batch], device=self.device)
        logits = self.body.logits(h[torch.arange(len(batch), device=self.device), last])
        for j, (row, start, n) in enumerate(batch):
            self.cache.copy_rows(stage, j, row.slot, start, n)
            self.cache.lengths[row.slot] = start + n
        return logits

    def _decode(self, chunks: list) -> None:
        """One token for every decoding row in one forward, with the native step also this
        step's prompt chunks (row, start, n): their positions ride along with the decoding rows,
        so a joining prompt costs the running streams a few rows of a step, not a forward."""
        slots = [s for s, r in enumerate(self._rows) if r is not None and r.pending is not None]
        if not slots and not chunks:
            return
        rows = [self._rows[s] for s in slots]
        if self._native is not None:
            entries = [(s, [r.pending]) for s, r in zip(slots, rows)]
            entries += [(row.slot, row.prompt[start:start + n]) for row, start, n in chunks]
            self._ensure(max(self.cache.lengths[s] + len(ids) for s, ids in entries))
            logits = self._native.rows(entries, self.cache)
            self.prefill_tokens_total += sum(n for _, _, n in chunks)
        else:
            hi = slots[-1] + 1
            live = [False] * hi
            tokens = [0] * hi
            for s in slots:
                live[s], tokens[s] = True, self._rows[s].pending
            self._ensure(max(self.cache.lengths[s] for s in slots) + 1)
            logits = decode_rows(self._forward, self.cache, torch.tensor(tokens, device=self.device)[:, None], live)
            logits = logits[slots] if len(slots) < hi else logits
        for row in rows:
            row.seq.append(row.pending)
        if rows:
            self._choose(rows, logits[:len(rows)])
        if chunks:
            self._prefilled(chunks, logits[len(rows):])

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits (one row per line) and emit it."""
        raw = logits.float()
        picks: list[int | None] = [None] * len(rows)
        greedy = [i for i, r in enumerate(rows) if r.cfg.temperature == 0 and r.seen is None]
        if greedy:  # the common case in one op
            pick = self._native.argmax if self._native is not None else (lambda t: t.argmax(-1).tolist())
            best = pick(raw[greedy] if len(greedy) < len(rows) else raw)
            for i, tok in zip(greedy, best):
                picks[i] = tok
        for i, row in enumerate(rows):
            if picks[i] is None:
                seen = row.seen[:row.n_seen][None] if row.seen is not None else None
                picks[i] = int(sample_next(raw[i:i + 1], row.cfg, seen, row.gen)[0])
        wants = [i for i, r in enumerate(rows) if r.logprobs is not None]
        lps: dict[int, tuple[float, list | None]] = {}
        if wants:  # OpenAI's logprobs: the raw distribution, before penalties and warpers
            lp = raw[wants].log_softmax(-1)
            chosen = lp.gather(-1, torch.tensor([[picks[i]] for i in wants])).squeeze(-1).tolist()
            k = max(rows[i].logprobs for i in wants)
            top = lp.topk(k, dim=-1) if k > 0 else None
            for j, i in enumerate(wants):
                alts = None
                if rows[i].logprobs > 0:
                    n = rows[i].logprobs
                    alts = list(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist()))
                lps[i] = (chosen[j], alts)
        for i, row in enumerate(rows):
            lp, alts = lps.get(i, (None, None))
            self._emit(row, picks[i], lp, alts)

    def _emit(self, row: _Row, token: int, logprob, alts) -> None:
        row.generated += 1
        row.handle.completion_tokens += 1
        self.completion_tokens_total += 1
        piece = row.text.push(token)
        reason = None
        if row.text.done:
            reason = "stop"
        elif row.generated >= row.budget:
            piece += row.text.finish()
            reason = "length"
        event = TokenEvent(token, piece, logprob, alts, reason, time.monotonic())
        if reason is None:
            row.pending = token
            if row.seen is not None:
                row.seen[row.n_seen] = token
                row.n_seen += 1
            row.handle._push(event)
            return
        self._release(row)
        self.finished[reason] += 1
        row.handle._push(event)

    def _release(self, row: _Row) -> None:
        """Free the slot; its KV (and ``_tokens``) stay for a later prompt with the same prefix."""
        self._rows[row.slot] = None
        if row in self._prefilling:
            self._prefilling.remove(row)

    def _free(self, row: _Row, reason: str) -> None:
        self._release(row)
        self._end(row.handle, reason)


def _score_prompt(model, ids: list[int], top: int, chunk: int = 256):
    """Prompt logprobs from one forward, the head applied ``chunk`` positions at a time (the
    full (T, vocab) logits of a long prompt would be large)."""
    body = getattr(model, "backbone", model)
    device = body.tok_emb.weight.device
    h = body.hidden_states(torch.tensor([ids], device=device))[0]
    out: list[tuple[float | None, list[tuple[int, float]]]] = [(None, [])]
    targets = torch.tensor(ids[1:], device=device)
    for a in range(0, len(ids) - 1, chunk):
        lp = body.logits(h[a:a + chunk]).float().log_softmax(-1)[: len(ids) - 1 - a]
        got = lp.gather(-1, targets[a:a + lp.shape[0], None]).squeeze(-1).tolist()
        alts = lp.topk(top, dim=-1) if top > 0 else None
        for j, g in enumerate(got):
            out.append((g, list(zip(alts.indices[j].tolist(), alts.values[j].tolist())) if alts is not None else []))
    return out


__all__ = ["Engine", "EngineStopped", "Handle", "QueueFull", "Request", "TokenEvent"]
