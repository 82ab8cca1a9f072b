"""Prometheus metrics of one instance, each registered in a registry of its own so apps can be built twice.

Counters move per message (not per subscriber) on the hot path; per-subscriber work is one integer add.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .message import Message

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.streams_open = Gauge("sse_streams_open", "SSE streams open on this instance", registry=r)
        self.channels_active = Gauge("sse_channels_active", "Channels with local subscribers", registry=r)
        self.published = Counter("sse_messages_published_total", "Messages accepted by this instance", registry=r)
        self.publish_rejected = Counter(
            "sse_publish_rejected_total", "Publishes refused", ["reason"], registry=r
        )
        self.received = Counter("sse_messages_received_total", "Messages the hub got from the broker", registry=r)
        self.delivered = Counter(
            "sse_messages_delivered_total",
            "Messages handed to local subscribers, written or queued (one per subscriber)",
            registry=r,
        )
        self.dropped = Counter(
            "sse_messages_dropped_total", "Messages not queued because a subscriber was too slow", registry=r
        )
        self.slow_disconnects = Counter(
            "sse_slow_client_disconnects_total", "Streams cut off because their queue was full", registry=r
        )
        self.redis_reconnects = Gauge(
            "sse_redis_reconnects", "Times the Redis pub/sub connection was lost and re-established", registry=r
        )
        self.latency = Histogram(
            "sse_publish_to_dispatch_seconds",
            "From the broker assigning the id to the hub queuing it to local subscribers",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.resumes = Counter("sse_resumes_total", "Streams resumed from history", ["result"], registry=r)

    def fanned_out(self, n: int) -> None:
        if n:
            self.delivered.inc(n)

    def received_message(self, message: Message) -> None:
        self.received.inc()
        self.latency.observe(max(0.0, time.time() - message.key[0] / 1000))

    def slow_disconnect(self) -> None:
        self.slow_disconnects.inc()
        self.dropped.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
