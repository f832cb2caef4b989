"""Prometheus metrics without per-session labels: counters, gauges and histograms.

Written from the engine's worker thread and read by the HTTP route on the event loop, so every
update takes a small lock. Rendering follows the Prometheus text exposition format 0.0.4.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["Counter", "EngineMetrics", "Gauge", "Histogram", "Registry"]

_M = TypeVar("_M", bound="_Metric")

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def render(self) -> list[str]:
        return [*self.header(), f"{self.name} {_fmt(self.value)}"]


class Gauge(_Metric):
    """A gauge whose value is read from a callback at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        super().__init__(name, help_text)
        self.read = read

    def render(self) -> list[str]:
        return [*self.header(), f"{self.name} {_fmt(float(self.read()))}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS_S
    ) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self.counts), self.sum, self.count
        lines = self.header()
        running = 0
        for bound, c in zip(self.buckets, counts, strict=False):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {n}')
        lines.append(f"{self.name}_sum {_fmt(total)}")
        lines.append(f"{self.name}_count {n}")
        return lines


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def counter(self, name: str, help_text: str) -> Counter:
        return self._add(Counter(name, help_text))

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> Gauge:
        return self._add(Gauge(name, help_text, read))

    def histogram(
        self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS_S
    ) -> Histogram:
        return self._add(Histogram(name, help_text, buckets))

    def _add(self, metric: _M) -> _M:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"


def _fmt(x: float) -> str:
    return repr(float(x)) if x != int(x) or abs(x) >= 1e15 else str(int(x))


class EngineMetrics:
    """The engine's own metrics (registered in a registry the server renders)."""

    def __init__(self, registry: Registry) -> None:
        r = registry
        self.ttft = r.histogram(
            "agent_runtime_time_to_first_token_seconds", "Admission to first generated token."
        )
        self.itl = r.histogram(
            "agent_runtime_inter_token_latency_seconds", "Time between tokens of one response."
        )
        self.queue = r.histogram(
            "agent_runtime_queue_time_seconds", "Admission to start of prefill."
        )
        self.retrieval = r.histogram(
            "agent_runtime_retrieval_seconds",
            "Batched memory-bank search of one model step (all sessions).",
        )
        self.step = r.histogram("agent_runtime_decode_step_seconds", "One batched decode step.")
        self.tokens = r.counter("agent_runtime_tokens_generated_total", "Tokens generated.")
        self.prompt_tokens = r.counter(
            "agent_runtime_prompt_tokens_total", "Prompt tokens prefilled."
        )
        self.responses = r.counter(
            "agent_runtime_responses_total", "Responses finished (any status)."
        )
        self.memory_written = r.counter(
            "agent_runtime_memory_entries_written_total", "Memory entries written."
        )
        self.snapshot = r.histogram(
            "agent_runtime_snapshot_seconds", "Writing one session snapshot."
        )
