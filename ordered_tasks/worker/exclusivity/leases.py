"""Partition leases on Redis: one consumer per partition, fenced, handed over within seconds."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

import redis
from kombu.utils.json import loads

from ...partitioning import queue_name
from ...queues import partition_queue
from ...redisscripts import RELEASE_LEASE, RENEW_LEASE
from ..health import metrics
from .fencing import DEADLINES

logger = logging.getLogger(__name__)

#: Seconds a lease lives without renewal; a dead owner's partitions move after this.
LEASE_TTL = 6.0
#: Seconds between renewals (and attempts to acquire the partitions not held).
LEASE_TICK = 1.0
#: The owner stops consuming a partition this long before its lease could lapse.
LEASE_MARGIN = 2.0



class LeaseKeeper:
    """Holds the leases of one worker's partitions; the worker consumes exactly those.

    A thread renews the leases every second (also while a long task runs or
    the worker drains at shutdown) and acquires free ones; each acquisition
    increments the partition's fencing token. The consumer applies the
    result from its event loop: before it consumes a partition it has just
    acquired, it puts the messages its predecessor left unacknowledged back
    at the head of the queue, so the message that was running when a worker
    died runs first.
    """

    def __init__(self, client: redis.Redis, prefix: str, partitions: list[int],
                 on_tenure: Callable[[list[int]], Any] = lambda partitions: None) -> None:
        self.client = client
        #: Called with the partition each time this worker starts consuming one it got (back):
        #: another worker may have changed its key states meanwhile.
        self.on_tenure = on_tenure
        self.prefix = prefix
        self.partitions = list(partitions)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: partition -> fencing token, for every lease held (renewed by the thread).
        self.leases: dict[int, int] = {}
        #: Partitions the consumer consumes (changed only from the event loop).
        self.consuming: set[int] = set()
        self.valid_until = 0.0
        self.acquiring = True
        self._stopped = threading.Event()
        self._renew = client.register_script(RENEW_LEASE)
        self._release = client.register_script(RELEASE_LEASE)
        self._thread: threading.Thread | None = None

    def lease_key(self, partition: int) -> str:
        return f"ordered_tasks:lease:{queue_name(self.prefix, partition)}"

    def fence_key(self, partition: int) -> str:
        return f"ordered_tasks:fence:{queue_name(self.prefix, partition)}"

    def fence_of(self, partition: int) -> int | None:
        """The fencing token of ``partition`` while this worker holds it, else None."""
        return self.leases.get(partition)

    def start(self) -> None:
        if self._thread is None:
            DEADLINES.enforce()
            self.renew()
            self._thread = threading.Thread(target=self._run, name="ordered-leases", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(LEASE_TICK):
            self.renew()

    def renew(self) -> None:
        """Renew held leases and acquire free ones (thread side)."""
        started = time.monotonic()
        ttl_ms = int(LEASE_TTL * 1000)
        try:
            for partition in list(self.leases):
                if not self._renew(keys=[self.lease_key(partition)], args=[self.owner, ttl_ms]):
                    logger.warning("Lost the lease of partition %d.", partition)
                    self.leases.pop(partition, None)
            self.valid_until = started + LEASE_TTL - LEASE_MARGIN
            acquired = {}
            for partition in self.partitions:
                if (self.acquiring and partition not in self.leases
                        and self.client.set(self.lease_key(partition), self.owner, nx=True, px=ttl_ms)):
                    acquired[partition] = self._past_stored_fence(
                        partition, int(self.client.incr(self.fence_key(partition))))
            # One update, so that the event loop sees every lease of this round at once.
            self.leases = {**self.leases, **acquired}
        except redis.RedisError as exc:
            logger.warning("Could not renew partition leases: %r", exc)
        for partition in self.partitions:
            DEADLINES.set(partition, self.valid_until if partition in self.leases else 0.0)

    def _past_stored_fence(self, partition: int, token: int) -> int:
        """``token``, or one past the database's fence if it is not newer (Redis lost its counter).

        The database keeps the highest token an owner wrote with, and refuses
        lower ones; a coordination Redis that restarted without persistence,
        evicted or was flushed would otherwise hand out tokens that every
        key-state write of the partition refuses, for good.
        """
        from django.db import close_old_connections

        from ...models import PartitionFence

        try:
            fences = PartitionFence.objects.filter(partition=partition).values_list("fence", flat=True)
            found = list(fences[:1])
            stored: int | None = found[0] if found else None
        except Exception as exc:  # no database now: the writes check the fence anyway
            logger.warning("Could not read the fence of partition %d: %r", partition, exc)
            return token
        finally:
            close_old_connections()
        if stored is None or token > stored:
            return token
        raised = int(self.client.incrby(self.fence_key(partition), stored + 1 - token))
        logger.warning("The fencing counter of partition %d was behind the database's (%d, now %d): the "
                       "coordination Redis lost it; raised past it.", partition, stored, raised)
        return raised

    def apply(self, consumer: Any) -> None:
        """Consume the partitions held and only those (event-loop side)."""
        task_consumer = consumer.task_consumer
        if task_consumer is None:
            return
        if time.monotonic() > self.valid_until:
            held: set[int] = set()
            if self.consuming:
                logger.error("Partition leases may lapse: no longer consuming %s.", sorted(self.consuming))
        else:
            held = set(self.leases)
        channel = task_consumer.channel
        for partition in sorted(self.consuming - held):
            self.consuming.discard(partition)
            metrics.partition_owned(partition, False)
            task_consumer.cancel_by_queue(partition_queue(self.prefix, partition).name)
            lanes = getattr(channel, "lanes", None)
            if lanes is not None:  # what waits in the window is the next owner's now
                lanes.drop_partition(partition)
        for partition in sorted(held - self.consuming):
            queue = partition_queue(self.prefix, partition)
            fence = self.leases.get(partition, 0)
            # A predecessor's unacknowledged messages, or after a reconnect this worker's own:
            # delivered but not run, or run but with the acknowledgement lost with the
            # connection. The completion ledger recognises the ones that already ran.
            forget_window = getattr(channel, "forget_window", None)
            if forget_window is not None:
                forget_window(queue.name, partition)
            restored = restore_to_head(channel, queue.name)
            self.on_tenure([partition])
            if not task_consumer.consuming_from(queue.name):
                task_consumer.add_queue(queue)
                task_consumer.consume()
            self.consuming.add(partition)
            metrics.partition_owned(partition, True)
            logger.info("Consuming partition %d (fence %d; %d message(s) put back at its head).",
                        partition, fence, restored)

    def stop_acquiring(self) -> None:
        self.acquiring = False

    def release_all(self) -> None:
        """Give the leases up, once the last task ran and was acknowledged."""
        self._stopped.set()
        for partition in list(self.leases):
            DEADLINES.set(partition, 0.0)  # nothing starts once the lease may be another's
            metrics.partition_owned(partition, False)
            try:
                self._release(keys=[self.lease_key(partition)], args=[self.owner])
            except redis.RedisError as exc:
                logger.warning("Could not release the lease of partition %d: %r", partition, exc)
            self.leases.pop(partition, None)


def restore_to_head(channel: Any, queue: str) -> int:
    """Put the unacknowledged messages of ``queue`` back at its head (kombu's Redis transport).

    They belong to a previous owner of the partition that died or stopped:
    the new owner holds the lease, so nobody else is running them. Several
    go back in the order they were delivered. The commands go through a
    pooled connection: ``channel.client`` is the one connection kombu keeps
    its ``BRPOP`` in flight on, and a command sent there would read the
    ``BRPOP`` reply (a message) instead of its own.
    """
    with channel.conn_or_acquire() as client:
        tags = []
        for tag, payload in client.hgetall(channel.unacked_key).items():
            try:
                _message, _exchange, routing_key = loads(payload)
            except (ValueError, TypeError):
                continue
            if routing_key == queue:
                tags.append(tag.decode() if isinstance(tag, bytes) else tag)
        # Each restore becomes the new head, so the latest delivered goes first and the
        # earliest ends at the head, in the order they had left the queue.
        delivered = {(t.decode() if isinstance(t, bytes) else t): when
                     for t, when in client.zrange(channel.unacked_index_key, 0, -1, withscores=True)}
        for tag in sorted(tags, key=lambda t: delivered.get(t, 0.0), reverse=True):
            channel.qos.restore_by_tag(tag, client=client, leftmost=False)
    return len(tags)
