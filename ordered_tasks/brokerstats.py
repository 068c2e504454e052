"""Queue depth and the age of the oldest waiting message of each partition, asked of the broker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kombu import Connection

from .coordination import client_for, is_redis
from .options import PUBLISHED_HEADER
from .partitioning import queue_name
from .redisscripts import aside_index, aside_lists

#: Seconds to wait for the broker before the page says it cannot be reached.
BROKER_TIMEOUT = 2.0


@dataclass
class QueueFigures:
    """What the broker says about one partition queue."""

    depth: int | None = None
    #: Seconds the message at the head has waited (Redis only: RabbitMQ cannot peek).
    oldest_age: float | None = None


class BrokerUnavailable(Exception):
    """The broker did not answer; the message says why."""


def queue_figures(broker_url: str, prefix: str, partitions: int,
                  transport_options: Mapping[str, Any] | None = None,
                  only: Iterable[int] | None = None) -> dict[int, QueueFigures]:
    """Depth (and on Redis the head's age) of every partition queue (or ``only`` those), in one connection."""
    numbers = range(partitions) if only is None else sorted(p for p in set(only) if 0 <= p < partitions)
    names = {p: queue_name(prefix, p) for p in numbers}
    try:
        if is_redis(broker_url):
            return _redis(broker_url, names, transport_options)
        return _amqp(broker_url, names)
    except BrokerUnavailable:
        raise
    except Exception as exc:
        raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _redis(url: str, names: dict[int, str],
           transport_options: Mapping[str, Any] | None) -> dict[int, QueueFigures]:
    """Depth and head's age of each queue, with the messages its worker set aside for busy keys."""
    prefix = str((transport_options or {}).get("global_keyprefix") or "")
    client = client_for(url, transport_options, socket_timeout=BROKER_TIMEOUT,
                        socket_connect_timeout=BROKER_TIMEOUT)
    try:
        pipe = client.pipeline(transaction=False)
        for name in names.values():
            pipe.smembers(prefix + aside_index(name))
        lists = {partition: [prefix + name, *aside_lists(keys, name, prefix).values()]
                 for (partition, name), keys in zip(names.items(), pipe.execute(), strict=True)}
        for keys in lists.values():
            for key in keys:
                pipe.llen(key)
                pipe.lindex(key, -1)  # kombu pops from this end: the head
        replies = iter(pipe.execute())
    finally:
        client.close()
    now = time.time()
    figures = {}
    for partition, keys in lists.items():
        depth, ages = 0, []
        for _key in keys:
            depth += int(next(replies))
            age = _age(next(replies), now)
            if age is not None:
                ages.append(age)
        figures[partition] = QueueFigures(depth, max(ages) if ages else None)
    return figures


def _age(raw: Any, now: float) -> float | None:
    if not raw:
        return None
    try:
        published = json.loads(raw)["headers"].get(PUBLISHED_HEADER)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return max(0.0, now - published) if isinstance(published, (int, float)) else None


def _amqp(url: str, names: dict[int, str]) -> dict[int, QueueFigures]:
    figures = {}
    with Connection(url, connect_timeout=BROKER_TIMEOUT, transport_options={"max_retries": 0}) as conn:
        conn.ensure_connection(max_retries=1, timeout=int(BROKER_TIMEOUT))
        channel: Any = conn.channel()
        for partition, name in names.items():
            try:
                _, depth, _ = channel.queue_declare(queue=name, passive=True)
            except conn.channel_errors:  # not declared yet: no worker or producer used it
                channel = conn.channel()
                depth = 0
            figures[partition] = QueueFigures(int(depth), None)
    return figures
