"""Kombu declarations of the partition queues."""

from __future__ import annotations

import functools

from kombu import Exchange, Queue

from .partitioning import queue_name


@functools.cache
def partition_queue(prefix: str, partition: int) -> Queue:
    """The durable queue of one partition, bound to a direct exchange of its name.

    This is the declaration Celery itself makes for a missing queue, so
    workers and producers always declare the queue identically.
    """
    name = queue_name(prefix, partition)
    return Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True)
