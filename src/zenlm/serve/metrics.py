"""Prometheus text exposition (format 0.0.4), written by hand: counters, gauges and histograms.

prometheus_client would do, but the server needs five metrics and one text format; this file
is smaller than the dependency's configuration. Updates take a lock because the engine thread
and the event loop both record (the GIL alone does not make ``+=`` on a dict entry atomic).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return str(int(x)) if x.is_integer() and abs(x) < 2**53 else repr(x)


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labels=()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(str(labels[n]) for n in self.label_names), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read when scraped (``fn``), or set by hand; ``fn`` may return labelled values."""

    kind = "gauge"

    def __init__(self, name, help, fn: Callable[[], float | dict[tuple[str, ...], float]] | None = None,
                 labels=()):
        super().__init__(name, help, labels)
        self.fn, self._value = fn, 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def lines(self) -> list[str]:
        got = self.fn() if self.fn is not None else self._value
        items = got.items() if isinstance(got, dict) else [((), got)]
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets: tuple[float, ...]):
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self._sum, self._n = 0.0, 0

    def observe(self, x: float) -> None:
        with self._lock:
            for i, b in enumerate(self.buckets):
                if x <= b:
                    self._counts[i] += 1
                    break
            self._sum += x
            self._n += 1

    @property
    def count(self) -> int:
        return self._n

    def lines(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._n
        out, running = self.header(), 0
        for b, c in zip(self.buckets, counts):
            running += c
            out.append(f'{self.name}_bucket{{le="{_num(b)}"}} {running}')
        return out + [f"{self.name}_sum {_num(total)}", f"{self.name}_count {n}"]


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Registry:
    """The server's metrics; ``render()`` is the body of ``/metrics``."""

    def __init__(self):
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines += m.lines()
        return "\n".join(lines) + "\n"


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
