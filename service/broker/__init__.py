"""Brokers: chosen from the URL, imported lazily so the embedded default needs no Redis client at all."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    Broker,
    BrokerBusy,
    BrokerError,
    BrokerUnavailable,
    IdempotencyKeyReused,
    OutcomeUnknown,
    Page,
    Published,
    RateCharge,
    RateLimited,
    Sink,
)

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Broker", "BrokerBusy", "BrokerError", "BrokerUnavailable", "IdempotencyKeyReused", "OutcomeUnknown", "Page",
           "Published", "RateCharge", "RateLimited", "Sink", "create_broker"]


def create_broker(settings: Settings) -> Broker:
    if not settings.redis_url:
        from .memory import MemoryBroker

        return MemoryBroker(history_size=settings.history_size, history_ttl=settings.history_ttl,
                            idempotency_ttl=settings.idempotency_ttl)
    from .redis import RedisBroker

    return RedisBroker.from_settings(settings)
