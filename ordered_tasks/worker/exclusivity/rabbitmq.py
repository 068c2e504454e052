"""RabbitMQ: a window of messages per partition queue, never a cancel, odd queues left alone."""

from __future__ import annotations

import errno
import logging
from contextlib import nullcontext
from typing import Any

from amqp.exceptions import RecoverableConnectionError
from kombu.transport import pyamqp

from ...conf import get_settings
from ...queues import partition_queue
from ..redelivery.ledger import flush_completions
from ..sequencing.lanes import Lanes
from ..sequencing.window import new_lanes
from ..setup import ordered_worker
from ..transport.frames import BatchingTransport, batching

logger = logging.getLogger(__name__)


class Channel(pyamqp.Channel):  # type: ignore[misc]
    """Kombu's py-amqp channel with the window of an ordered worker, and no cancel.

    **A window of unacknowledged messages per consumer.** Celery applies its
    prefetch limit to the whole channel (``global``). Here every
    ``basic.qos`` sets a limit of ``ORDERED_TASKS["WINDOW"]`` per consumer,
    that is per partition queue, and each delivered message goes to its
    key's lane (:attr:`lanes`), which starts the messages of one key one at
    a time, in delivery order; an acknowledgement or reject tells the lanes
    that the message settled. A message that cannot finish is run again in
    place rather than requeued, so nothing of a partition is delivered
    again behind messages that overtook it.

    **A partition queue's consumer is never cancelled.** Celery cancels the
    task consumer when it stops (a lost connection), at a warm shutdown and
    at a cold shutdown, each time before the connection closes. Cancelling
    makes RabbitMQ promote a standby consumer of the single-active-consumer
    queue at once, while this worker still runs, or holds unacknowledged, a
    message of the partition: the standby could run later messages of the
    partition first. RabbitMQ 3.10 also fails to feed the promoted consumer
    after a cancel, and the next message published to the queue crashes the
    queue process, which loses the messages it held and those published
    until it restarts. Without the cancel, the handover happens when the
    connection closes: RabbitMQ puts the unacknowledged messages back in
    their place, then promotes the standby. (The ``cancel_consumer``
    remote control command is refused for partition queues by the consumer
    itself, with a warning.)
    """

    #: Consumer tags of the partition queues this channel consumes, with the queue names.
    _partition_consumers: dict[str, str]
    _lanes: Lanes | None = None

    @property
    def lanes(self) -> Lanes:
        """The per-key lanes of the messages delivered on this channel.

        Nothing of them starts once the channel closed (py-amqp marks every
        channel of a lost connection closed): RabbitMQ put its messages back
        and may have made a standby the queue's active consumer, while a task
        of this worker that ended after the loss would otherwise start its
        key's next message here too.
        """
        if self._lanes is None:
            self._lanes = new_lanes(open_=lambda: bool(self.is_open))
        return self._lanes

    def basic_qos(self, prefetch_size: int = 0, prefetch_count: int = 0, a_global: bool = False,
                  *args: Any, **kwargs: Any) -> Any:
        return super().basic_qos(0, get_settings().window, False)

    def basic_ack(self, delivery_tag: Any, *args: Any, **kwargs: Any) -> Any:
        flush_completions()  # the completion ledger first: a redelivered copy is recognised
        try:
            return super().basic_ack(delivery_tag, *args, **kwargs)
        finally:
            if self._lanes is not None:
                self._lanes.settled(delivery_tag)

    def basic_reject(self, delivery_tag: Any, requeue: bool = True, *args: Any, **kwargs: Any) -> Any:
        if requeue and self._lanes is not None:
            for follower in self._lanes.recall(delivery_tag):
                # Later messages of its key that waited in the window go back with it
                # (RabbitMQ puts each back in its own place), so none runs before it.
                super().basic_reject(follower.tag, True)  # type: ignore[arg-type]
        try:
            return super().basic_reject(delivery_tag, requeue, *args, **kwargs)
        finally:
            if self._lanes is not None:
                self._lanes.settled(delivery_tag)

    def basic_consume(self, queue: str = "", consumer_tag: str = "", *args: Any, **kwargs: Any) -> Any:
        tag = super().basic_consume(queue, consumer_tag, *args, **kwargs)
        if get_settings().partition_of_queue(queue) is not None:
            if not hasattr(self, "_partition_consumers"):
                self._partition_consumers = {}
            self._partition_consumers[tag] = queue
        return tag

    def basic_cancel(self, consumer_tag: str, *args: Any, **kwargs: Any) -> Any:
        queue = getattr(self, "_partition_consumers", {}).get(consumer_tag)
        if queue is None:
            return super().basic_cancel(consumer_tag, *args, **kwargs)
        logger.debug("Not cancelling the consumer of %s: it ends with the connection.", queue)
        return None


class Connection(pyamqp.Connection):  # type: ignore[misc]
    """Kombu's py-amqp connection, with the channels of an ordered worker; over TCP it reads ahead."""

    Channel = Channel

    def Transport(self, host: str, connect_timeout: Any, ssl: Any = False, read_timeout: Any = None,
                  write_timeout: Any = None, socket_settings: Any = None, **kwargs: Any) -> Any:
        """py-amqp's transport for the connection; over TCP one that reads ahead and writes acks together."""
        if ssl:
            return super().Transport(host, connect_timeout, ssl, read_timeout, write_timeout,
                                     socket_settings=socket_settings, **kwargs)
        return BatchingTransport(host, connect_timeout=connect_timeout, ssl=ssl, read_timeout=read_timeout,
                                  write_timeout=write_timeout, socket_settings=socket_settings, **kwargs)


#: Deliveries already received that one drain hands on at most, after the one it waited for.
DRAIN_MORE = 64
#: How long such a drain waits for a further delivery (seconds).
DRAIN_MORE_WAIT = 0.0005


class DrainsWhatArrived:
    """A drain hands on every delivery that already arrived, not only the first.

    Celery's loop for green pools (gevent, eventlet) drains one delivery
    per turn and then waits up to 0.1 s on its event connection, so a
    worker that holds a window of messages would start one message per
    0.1 s. The prefork and threads pools read through kombu's event loop
    and never call this.
    """

    def drain_events(self, connection: Any, **kwargs: Any) -> Any:
        result = super().drain_events(connection, **kwargs)  # type: ignore[misc]
        for _ in range(DRAIN_MORE):
            try:
                super().drain_events(connection, timeout=DRAIN_MORE_WAIT)  # type: ignore[misc]
            except TimeoutError:  # nothing more yet (a frame read in part stays buffered)
                break
        return result


class Transport(DrainsWhatArrived, pyamqp.Transport):  # type: ignore[misc]
    """Kombu's py-amqp transport, with the channels of an ordered worker."""

    Connection = Connection

    def on_readable(self, connection: Any, loop: Any) -> None:
        """The event loop's read: every delivery already read ahead, then on while the socket has more.

        Kombu's reader hands on one delivery per turn of the loop and relies
        on the socket staying readable for the next; frames read ahead (see
        ``ordered_tasks.worker.transport.frames``) are no longer in the
        socket, so they are all handed on here, and the turn ends with none
        left whole in the buffer.
        """
        if not connection.connected:
            raise RecoverableConnectionError("Socket was disconnected")
        transport = batching(connection)
        try:
            with transport.ahead() if transport is not None else nullcontext():
                connection.drain_events(timeout=0)
                while transport is not None and transport.has_frame():
                    connection.drain_events(timeout=0)
        except TimeoutError:
            return
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return
            raise
        loop.call_soon(self.on_readable, connection, loop)


class SSLTransport(DrainsWhatArrived, pyamqp.SSLTransport):  # type: ignore[misc]
    """Kombu's py-amqp transport over TLS (``amqps://``), with the channels of an ordered worker."""

    Connection = Connection


#: Partition queues this process reported as declared without single active consumer.
_REFUSED: set[str] = set()


def consume_declarable_queues(app: Any, connection: Any) -> None:
    """Consume only the partition queues declared as ordered_tasks declares them.

    A producer in another language that declares a partition queue first,
    without ``x-single-active-consumer`` (celery-node declares with no
    arguments), makes every declaration of ours fail with ``406
    PRECONDITION_FAILED``, and Celery would restart the consumer over and
    over, serving no partition at all. Such a queue is left alone (its
    messages wait, in order) and reported once; the others are served. The
    check runs at every (re)connection, so a queue fixed meanwhile is
    consumed again.
    """
    setup = ordered_worker(app)
    partitions = setup.partitions if setup is not None else []
    prefix = get_settings().queue_prefix
    channel = connection.channel()
    try:
        for partition in partitions:
            queue = partition_queue(prefix, partition)
            try:
                queue(channel).declare()
            except connection.channel_errors as exc:
                channel = connection.channel()  # the broker closed the other one
                app.amqp.queues.deselect(queue.name)
                if queue.name not in _REFUSED:
                    _REFUSED.add(queue.name)
                    logger.error(
                        "Not consuming partition %d: its queue %s exists with other arguments than "
                        "ordered_tasks declares (%r), probably declared by another producer without "
                        "x-single-active-consumer. Its messages wait. Drain and delete the queue, "
                        "and let only ordered_tasks declare it (see the partitioning page of the "
                        "docs); this worker checks again when it reconnects.", partition, queue.name, exc)
                continue
            app.amqp.queues.select_add(queue)
            if queue.name in _REFUSED:
                _REFUSED.discard(queue.name)
                logger.warning("Consuming partition %d again: its queue is declared as expected.", partition)
    finally:
        channel.close()
