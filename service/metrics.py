"""Prometheus metrics of one instance, each registered in a registry of its own so apps can be built twice.

Counters move per message (not per subscriber) on the hot path; per-subscriber work is one integer add.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .message import Message

if TYPE_CHECKING:
    from .worker_metrics import SharedMetrics

__all__ = ["CONTENT_TYPE_LATEST", "LATENCY_BUCKETS", "Metrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.streams_open = Gauge("sse_streams_open", "SSE streams open on this instance", registry=r)
        self.channels_active = Gauge("sse_channels_active", "Channels with local subscribers", registry=r)
        self.publish_rejected = Counter(
            "sse_publish_rejected_total", "Publishes refused", ["reason"], registry=r
        )
        self.dropped = Counter(
            "sse_messages_dropped_total", "Messages not queued because a subscriber was too slow", registry=r
        )
        self.streams_closed = Counter(
            "sse_streams_closed_total",
            "Streams ended, by reason: gone (client left), slow (queue full), stalled (a write blocked for "
            "SEND_TIMEOUT), drain, shutdown, expired (token), full, ended (POST /admin/end)",
            ["reason"], registry=r,
        )
        self._closed_by: dict[str, Any] = {}  # reason -> its labelled child (`stream_closed`)
        self.slow_disconnects = Counter(
            "sse_slow_client_disconnects_total", "Streams cut off because their queue was full", registry=r
        )
        self.broker_up = Gauge("sse_broker_up", "1 while every Redis pub/sub connection of this instance is up",
                               registry=r)
        self.resumes = Counter("sse_resumes_total", "Streams resumed from history", ["result"], registry=r)
        self.hook_denials = Counter("sse_auth_hook_denied_total", "Requests the authorization hook refused",
                                    ["action"], registry=r)
        # Per message: plain integers, exposed at scrape time (a prometheus_client Counter or Histogram takes a lock
        # and a method call or two per update, ~3 % of the publish path's CPU in the profile).
        self.published_count = 0
        self.received_count = 0
        self.delivered_count = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: above every bucket (+Inf only)
        self.latency_sum = 0.0
        # Per HTTP request, the same way: (method, route template, status) -> [count, sum, bucket counts...].
        self.requests: dict[tuple[str, str, str], list[float]] = {}
        r.register(_MessageCollector(self))
        # WORKERS > 1: this worker's side of the instance's metrics (service/worker_metrics.py); None otherwise.
        self.shared: SharedMetrics | None = None

    def watch_broker(self, stats: Callable[[], dict[str, float]]) -> None:
        """Expose the broker's own figures, read at scrape time (the broker keeps plain numbers)."""
        self.registry.register(_BrokerCollector(stats))

    def watch_hooks(self, stats: Callable[[], dict[str, dict[str, float]]]) -> None:
        """Expose the hooks' own figures (hooks.py keeps plain numbers), read at scrape time."""
        self.registry.register(_HookCollector(stats))

    def hook_denied(self, action: str) -> None:
        self.hook_denials.labels(action).inc()

    def published_message(self) -> None:
        self.published_count += 1

    def fanned_out(self, n: int) -> None:
        self.delivered_count += n

    def received_message(self, message: Message) -> None:
        self.received_count += 1
        latency = time.time() - message.key[0] / 1000
        if latency < 0.0:  # the broker's clock is a little ahead of ours
            latency = 0.0
        self.latency_sum += latency
        self.latency_counts[bisect_left(LATENCY_BUCKETS, latency)] += 1  # le: the first bound >= latency

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        row = self.requests.get(key)
        if row is None:
            row = self.requests[key] = [0.0] * (len(LATENCY_BUCKETS) + 3)
        row[0] += 1
        row[1] += seconds
        row[2 + bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def stream_closed(self, reason: str) -> None:
        """Count a stream's end: its labelled child kept per reason, not looked up (`labels`: a lock, a tuple and
        a dict lookup) once per stream: a replica's streams all end at once when it drains or its clients move."""
        child = self._closed_by.get(reason)
        if child is None:
            child = self._closed_by[reason] = self.streams_closed.labels(reason)
        child.inc()

    def slow_disconnect(self) -> None:
        self.slow_disconnects.inc()
        self.dropped.inc()

    def share(self, directory: Path, index: int) -> SharedMetrics:
        """Answer scrapes for every worker of the instance, sharing figures through `directory` as worker `index`."""
        from .worker_metrics import SharedMetrics

        self.shared = SharedMetrics(self, directory, index)
        return self.shared

    def render(self) -> bytes:
        if self.shared is not None:
            return self.shared.render()
        return generate_latest(self.registry)


class _MessageCollector(Collector):
    """The per-message figures of `Metrics`, in the form prometheus_client's Counter and Histogram would give."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield CounterMetricFamily("sse_messages_published", "Messages accepted by this instance",
                                  value=m.published_count)
        yield CounterMetricFamily("sse_messages_received", "Messages the hub got from the broker",
                                  value=m.received_count)
        yield CounterMetricFamily("sse_messages_delivered",
                                  "Messages handed to local subscribers, written or queued (one per subscriber)",
                                  value=m.delivered_count)
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, math.inf), m.latency_counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))  # as Histogram labels them
        yield HistogramMetricFamily("sse_publish_to_dispatch_seconds",
                                    "From the broker assigning the id to the hub queuing it to local subscribers",
                                    buckets=buckets, sum_value=m.latency_sum)
        labels = ["method", "route", "status"]
        requests = CounterMetricFamily("sse_http_requests", "HTTP requests answered, by route template and status "
                                    "(a stream counts when its answer starts)", labels=labels)
        latency = HistogramMetricFamily("sse_http_request_duration_seconds",
                                        "Time to answer a request (a stream: to its first byte)", labels=labels)
        for key, row in list(m.requests.items()):
            requests.add_metric(list(key), row[0])
            running, hist = 0.0, []
            for bound, n in zip((*LATENCY_BUCKETS, math.inf), row[2:], strict=True):
                running += n
                hist.append(("+Inf" if bound == math.inf else repr(bound), running))
            latency.add_metric(list(key), hist, row[1])
        yield requests
        yield latency


class _HookCollector(Collector):
    """Per hook (`auth`, `publish`): calls made, failures by kind; for `auth` also answers taken from the cache
    or from a call already in flight, and decisions remembered."""

    def __init__(self, stats: Callable[[], dict[str, dict[str, float]]]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily("sse_hook_calls", "Calls made to a hook", labels=["hook"])
        failures = CounterMetricFamily("sse_hook_failures", "Hook calls without a usable answer, by kind "
                                       "(timeout, unreachable, invalid, busy)", labels=["hook", "kind"])
        saved = CounterMetricFamily("sse_auth_hook_saved", "Authorization questions answered without a call of "
                                    "their own", labels=["by"])
        cached = GaugeMetricFamily("sse_auth_hook_cache_entries", "Authorization decisions remembered")
        for hook, stats in self._stats().items():
            calls.add_metric([hook], stats.get("calls", 0))
            for name, value in stats.items():
                if name.startswith("failures."):
                    failures.add_metric([hook, name.removeprefix("failures.")], value)
            if hook == "auth":
                saved.add_metric(["cache"], stats.get("cache_hits", 0))
                saved.add_metric(["coalescing"], stats.get("coalesced", 0))
                cached.add_metric([], stats.get("cache_entries", 0))
        yield from (calls, failures, saved, cached)


class _BrokerCollector(Collector):
    _GAUGES = {
        "channels_wanted": "Channels with local subscribers, as the broker sees them",
        "channels_pending": "Wanted channels not yet subscribed and filled at the broker (0 when in step)",
        "pool_in_use": "Redis commands in flight (REDIS_POOL_SIZE at most)",
        "pool_waiting": "Redis commands waiting for a free connection",
        "readers": "Redis pub/sub connections this instance keeps (one per Cluster primary)",
        "readers_connected": "Of those, connected now",
        "history_channels": "Channels with history in the embedded broker",
    }
    _COUNTERS = {
        "channels_repaired": "Channels the reconciler found wanted but not subscribed, and queued again",
        "reconnects": "Times a Redis pub/sub connection was lost and re-established",
    }

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for name, help_text in self._GAUGES.items():
            if name in stats:
                yield GaugeMetricFamily(f"sse_broker_{name}", help_text, value=stats[name])
        for name, help_text in self._COUNTERS.items():
            if name in stats:
                yield CounterMetricFamily(f"sse_broker_{name}", help_text, value=stats[name])
        errors = CounterMetricFamily("sse_redis_errors", "Redis errors by kind (docs/reliability.md)",
                                     labels=["kind"])
        for key, value in stats.items():
            if key.startswith("errors."):
                errors.add_metric([key[7:]], value)
        yield errors
