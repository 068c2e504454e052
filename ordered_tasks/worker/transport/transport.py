"""The transports of an ordered worker's broker connection: kombu's, with ordered_tasks' channels."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.transport import pyamqp, resolve_transport
from kombu.transport import redis as kombu_redis
from kombu.utils.imports import symbol_by_name

from ..exclusivity import rabbitmq
from .fetch import ReliableChannel, ReliableSentinelChannel


class RedisTransport(kombu_redis.Transport):  # type: ignore[misc]
    """Kombu's Redis transport whose channels fetch reliably and requeue at the head."""

    Channel = ReliableChannel


class SentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]
    """Kombu's Sentinel transport whose channels fetch reliably and requeue at the head."""

    Channel = ReliableSentinelChannel


def ordered_transport(app: Celery) -> str | None:
    """The transport an ordered worker of ``app`` consumes with (its dotted path), or None for kombu's own.

    Chosen from the transport the app's broker URL names: kombu's Redis,
    Sentinel and py-amqp transports each get ordered_tasks' subclass. A
    path rather than the class, so that ``inspect stats`` can show it.
    """
    name: Any = app.connection_for_read().transport_cls
    cls: type = name if isinstance(name, type) else symbol_by_name(resolve_transport(name) or name)
    if issubclass(cls, (RedisTransport, SentinelTransport, rabbitmq.Transport, rabbitmq.SSLTransport)):
        return f"{cls.__module__}:{cls.__qualname__}"
    if issubclass(cls, pyamqp.SSLTransport):
        return f"{rabbitmq.__name__}:SSLTransport"
    if issubclass(cls, pyamqp.Transport):
        return f"{rabbitmq.__name__}:Transport"
    if issubclass(cls, kombu_redis.SentinelTransport):
        return f"{__name__}:SentinelTransport"
    if issubclass(cls, kombu_redis.Transport):
        return f"{__name__}:RedisTransport"
    return None
