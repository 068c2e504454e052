"""Kombu declarations of the partition queues."""

from __future__ import annotations

import functools

from kombu import Exchange, Queue

from .partitioning import queue_name

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
