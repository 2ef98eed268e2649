"""Per-key limits: request rate, daily token quota, concurrency.

- Rate is a sliding window: at most ``rate_per_min`` admissions in any 60 s. Exact, so "60/min"
  means what it says, and Retry-After is when the oldest admission in the window leaves it. It
  lives in memory: a restart forgives at most one minute.
- The daily token quota counts tokens per UTC day in the key store's SQLite file (table
  ``usage``), so a restart does not reset it and a second server process shares it. ``admit``
  reserves the tokens the server expects (the prompt, say) while the request runs, so
  concurrent requests cannot all slip under the quota at once; ``Permit.charge`` adds what was
  really used. A request that starts under the quota is allowed to finish past it; the next one
  is refused until midnight UTC.
- Concurrency counts requests between ``admit`` and the permit's release.

All three are checked before any is counted: a request refused for one limit uses none of the
others.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from zenlm.errors import RateLimited
from zenlm.serve.keys import KeyRecord, KeyStore

WINDOW = 60.0


def utc_day(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")


def seconds_to_midnight(t: float) -> float:
    now = datetime.fromtimestamp(t, timezone.utc)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


class Permit:
    """One admitted request: a context manager that releases its concurrency slot and token
    reservation on exit (``release`` does the same, once, for code that cannot use ``with``)."""

    def __init__(self, limiter: "Limiter", record: KeyRecord, reserved: int):
        self.limiter, self.record, self.reserved = limiter, record, reserved
        self.charged = 0
        self._released = False

    def charge(self, tokens: int) -> None:
        """Count ``tokens`` against today's quota now (persisted)."""
        if tokens > 0:
            self.charged += tokens
            self.limiter._charge(self.record, tokens)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.limiter._release(self.record, self.reserved)

    def __enter__(self) -> "Permit":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Limiter:
    def __init__(self, store: KeyStore, *, clock: Callable[[], float] | None = None):
        self.store = store
        self.clock = clock or store.clock
        self._lock = threading.Lock()
        self._window: dict[str, deque[float]] = defaultdict(deque)
        self._running: dict[str, int] = defaultdict(int)
        self._reserved: dict[str, int] = defaultdict(int)

    def used_today(self, key_id: str) -> int:
        row = self.store.query_one("SELECT tokens FROM usage WHERE key_id = ? AND day = ?",
                                   (key_id, utc_day(self.clock())))
        return row[0] if row else 0

    def admit(self, record: KeyRecord, tokens: int = 0) -> Permit:
        """A permit for one request expected to use ``tokens``; RateLimited (429) otherwise."""
        now = self.clock()
        with self._lock:
            if record.concurrency is not None and self._running[record.id] >= record.concurrency:
                raise RateLimited(f"API key {record.id} already has {record.concurrency} requests running "
                                  f"(its concurrency limit)", retry_after=1, limit="concurrency")
            window = self._window[record.id]
            if record.rate_per_min is not None:
                while window and window[0] <= now - WINDOW:
                    window.popleft()
                if len(window) >= record.rate_per_min:
                    raise RateLimited(f"API key {record.id} is over its rate of {record.rate_per_min}/min",
                                      retry_after=window[0] + WINDOW - now, limit="rate")
            if record.tokens_per_day is not None:
                used = self.used_today(record.id) + self._reserved[record.id]
                if used + tokens > record.tokens_per_day:
                    raise RateLimited(f"API key {record.id} is over its quota of {record.tokens_per_day} "
                                      f"tokens/day ({used} used or running, {tokens} asked)",
                                      retry_after=seconds_to_midnight(now), limit="tokens")
            if record.rate_per_min is not None:
                window.append(now)
            self._running[record.id] += 1
            self._reserved[record.id] += tokens
        return Permit(self, record, tokens)

    def running(self, key_id: str) -> int:
        with self._lock:
            return self._running[key_id]

    def _charge(self, record: KeyRecord, tokens: int) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT INTO usage (key_id, day, tokens) VALUES (?, ?, ?) "
                       "ON CONFLICT (key_id, day) DO UPDATE SET tokens = tokens + excluded.tokens",
                       (record.id, utc_day(self.clock()), tokens))

    def _release(self, record: KeyRecord, reserved: int) -> None:
        with self._lock:
            self._running[record.id] -= 1
            self._reserved[record.id] -= reserved
