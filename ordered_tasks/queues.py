"""Kombu declarations of the partition queues, and the one function that finds a key's queue."""

from __future__ import annotations

import functools
from typing import NamedTuple

from kombu import Exchange, Queue

from .conf import get_settings
from .partitioning import partition_of, queue_name

#: Arguments of every partition queue (RabbitMQ: one active consumer at a time).
QUEUE_ARGUMENTS = {"x-single-active-consumer": True}


@functools.cache
def partition_queue(prefix: str, partition: int) -> Queue:
    """The durable queue of one partition, bound to a direct exchange of its name.

    Producers and workers both use this declaration, so they always declare
    the queue identically. On RabbitMQ the queue has a single active consumer
    (``x-single-active-consumer``): other consumers wait as standbys. Other
    transports ignore the argument.
    """
    name = queue_name(prefix, partition)
    return Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True,
                 queue_arguments=QUEUE_ARGUMENTS)


class KeyQueue(NamedTuple):
    """Where the messages of one key go."""

    partition: int
    queue: Queue


def queue_of_key(key: object) -> KeyQueue:
    """The partition and partition queue of ``key`` under the current settings.

    Publishing, routing and the worker's replays all ask this function.
    """
    conf = get_settings()
    partition = partition_of(key, conf.partitions)
    return KeyQueue(partition, partition_queue(conf.queue_prefix, partition))


def queue_for(key: object) -> str:
    """Queue of ``key``: ``f"{QUEUE_PREFIX}.{partition_for(key)}"``."""
    return queue_of_key(key).queue.name
