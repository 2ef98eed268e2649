"""The engine seen from a request: submit its choices, merge their token events, cancel on exit.

A request with ``n`` choices (or a list of prompts) becomes several engine requests; their
events arrive interleaved and are told apart by choice index. Whatever way the request ends
(done, client gone, error), every handle it submitted is cancelled on the way out, so a row
never outlives the client that asked for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, ev) -> None:
        self.text += ev.text
        if ev.token is not None:
            self.tokens.append(ev.token)
            self.logprobs.append(ev.logprob)
            self.tops.append(ev.top_logprobs)
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason


class Generation:
    """The engine handles of one request. ``events()`` yields ``(index, TokenEvent)``."""

    def __init__(self, engine, requests: list, *, on_token=None, t0: float | None = None):
        self.handles = []
        self.on_token = on_token  # on_token(ttft=..., tbt=...): the server's histograms
        self.t0 = time.perf_counter() if t0 is None else t0
        try:
            for r in requests:
                self.handles.append(engine.submit(r))
        except BaseException:
            self.cancel()  # a full queue half way: free what was admitted
            raise

    def cancel(self) -> None:
        for h in self.handles:
            try:
                h.cancel()
            except Exception:  # an already finished handle: nothing to free
                pass

    @property
    def completion_tokens(self) -> int:
        return sum(int(getattr(h, "completion_tokens", 0) or 0) for h in self.handles)

    async def events(self) -> AsyncIterator[tuple[int, object]]:
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i, handle):
            try:
                async for ev in handle:
                    queue.put_nowait((i, ev))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the engine failed this row: surface it to the request
                queue.put_nowait((i, exc))
            finally:
                queue.put_nowait((i, done))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        live, first, last = len(tasks), True, {}
        try:
            while live:
                i, ev = await queue.get()
                if ev is done:
                    live -= 1
                    continue
                if isinstance(ev, Exception):
                    raise ev
                if ev.token is not None and self.on_token is not None:
                    now = time.perf_counter()
                    if first:
                        self.on_token(ttft=now - self.t0)
                        first = False
                    if i in last:
                        self.on_token(tbt=now - last[i])
                    last[i] = now
                yield i, ev
        finally:
            self.cancel()
            for t in tasks:
                t.cancel()

    async def collect(self, is_disconnected=None) -> list[Choice]:
        """Run every choice to its end; a client that goes away cancels them (checked every
        quarter second, so its rows are freed well within a second)."""
        choices = [Choice(i) for i in range(len(self.handles))]
        watcher = None
        if is_disconnected is not None:
            async def watch():
                while True:
                    await asyncio.sleep(0.25)
                    if await is_disconnected():
                        self.cancel()
                        return
            watcher = asyncio.create_task(watch())
        try:
            async for i, ev in self.events():
                choices[i].add(ev)
        finally:
            if watcher is not None:
                watcher.cancel()
        return choices
