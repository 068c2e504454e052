"""Kombu's Redis and Sentinel transports, with the channels of an ordered worker."""

from __future__ import annotations

from kombu.transport import redis as kombu_redis

from .fetch import ReliableChannel, ReliableSentinelChannel


class RedisTransport(kombu_redis.Transport):  # type: ignore[misc]
    """Kombu's Redis transport whose channels fetch reliably and requeue at the head."""

    Channel = ReliableChannel


class SentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    """Kombu's Sentinel transport whose channels fetch reliably and requeue at the head."""

    Channel = ReliableSentinelChannel
