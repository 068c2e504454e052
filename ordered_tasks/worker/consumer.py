"""Celery's consumer, parking the messages of partition queues that it would drop."""

from __future__ import annotations

import logging
import weakref
from typing import Any

from celery import bootsteps, signals
from celery.worker import state
from celery.worker.consumer import Consumer
from celery.worker.consumer.tasks import Tasks

from ..compat import never_cancel, override_step_methods
from ..conf import get_settings
from ..coordination import coordination_client
from ..exceptions import ConfigurationError
from ..models import ParkedMessage
from ..queues import partition_queue
from ..routing import key_spec_for
from .exclusivity.leases import LEASE_TICK, LeaseKeeper
from .failures.book import BOOK
from .failures.unrunnable import hand_over
from .health.figures import FIGURES
from .launch.startup import ORDERED_APPS
from .transport.fetch import start_fetching_reliably
from .transport.transport import ordered_transport

Reason = ParkedMessage.Reason
logger = logging.getLogger(__name__)
_current: weakref.ref[OrderedConsumer] | None = None


_keeper: LeaseKeeper | None = None


def current_keeper() -> LeaseKeeper | None:
    """The lease keeper of this worker (Redis broker only), or None."""
    return _keeper


def current_pool() -> Any:
    """The pool of this worker's consumer, or None outside an ordered worker."""
    consumer = _current() if _current is not None else None
    return consumer.pool if consumer is not None else None


def _is_amqp(consumer: Any) -> bool:
    connection = getattr(consumer, "connection", None)
    return connection is not None and connection.transport.driver_type == "amqp"


def _never_cancel() -> None:
    """``cancel`` (and its alias ``close``) of a RabbitMQ task consumer: nothing is cancelled.

    Celery cancels the task consumer when it stops (a lost connection), at a
    warm shutdown (``Tasks.shutdown`` calls kombu's ``close``, which is
    ``cancel``) and at a cold shutdown, each time before the connection
    closes. Cancelling makes RabbitMQ promote a standby consumer of the
    single-active-consumer queue at once, while this worker still runs, or
    holds unacknowledged, a message of the partition: the standby could run
    later messages of the partition first. RabbitMQ 3.10 also fails to feed
    the promoted consumer after a cancel, and the next message published to
    the queue crashes the queue process, which loses the messages it held
    and those published until it restarts. Without the cancel, the handover
    happens when the connection closes: RabbitMQ puts the unacknowledged
    messages back in their place, then promotes the standby.
    """


def _start_tasks_step(step: Tasks, c: Any) -> None:
    """Start of Celery's ``Tasks`` step; on RabbitMQ, a prefetch limit of 1 per partition queue and no cancel.

    Celery would allow concurrency times prefetch multiplier unacknowledged
    messages per consumer; a worker with several pool processes would then
    run two messages of one partition at once. The task consumer is never
    cancelled (see :func:`_never_cancel`).
    """
    amqp = _is_amqp(c)
    if amqp:
        c.initial_prefetch_count = 1
        consume_declarable_queues(c)
    BOOK.new_tenure()  # a new connection: another worker may have had the partitions
    FIGURES.new_tenure()
    Tasks.start(step, c)
    if amqp:
        never_cancel(c.task_consumer, _never_cancel)


#: Partition queues this process reported as declared without single active consumer.
_REFUSED: set[str] = set()


def consume_declarable_queues(c: Any) -> None:
    """RabbitMQ: consume only the partition queues declared as ordered_tasks declares them.

    A producer in another language that declares a partition queue first,
    without ``x-single-active-consumer`` (celery-node declares with no
    arguments), makes every declaration of ours fail with ``406
    PRECONDITION_FAILED``, and Celery would restart the consumer over and
    over, serving no partition at all. Such a queue is left alone (its
    messages wait, in order) and reported once; the others are served. The
    check runs at every (re)connection, so a queue fixed meanwhile is
    consumed again.
    """
    app = c.app
    partitions = ORDERED_APPS.get(app) or []
    prefix = get_settings().queue_prefix
    channel = c.connection.channel()
    try:
        for partition in partitions:
            queue = partition_queue(prefix, partition)
            try:
                queue(channel).declare()
            except c.connection.channel_errors as exc:
                channel = c.connection.channel()  # the broker closed the other one
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


def _per_consumer_qos(step: Tasks, c: Any) -> bool:
    """Celery's choice of QoS scope, except per consumer (so per partition queue) on RabbitMQ.

    Celery applies the prefetch limit of 1 to the whole channel: the broker
    sends the next message only once the last one is acknowledged, so the
    worker waits a round trip per task. Applied per consumer, each partition
    queue has at most one unacknowledged message, which keeps every
    partition's order (nothing of a partition is delivered behind a message
    that may still be requeued), while the messages of other partitions are
    already waiting when a task ends.
    """
    return False if _is_amqp(c) else Tasks.qos_global(step, c)


class OrderedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer for partition queues.

    It parks unknown, invalid and undecodable messages instead of dropping
    them, and on RabbitMQ hands a partition over to a standby only after
    its running task is acknowledged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        global _current
        super().__init__(*args, **kwargs)
        _current = weakref.ref(self)
        for step in self.blueprint.steps.values():
            if isinstance(step, Tasks):
                override_step_methods(step, start=_start_tasks_step, qos_global=_per_consumer_qos)

    def connection_for_read(self, heartbeat: float | None = None) -> Any:
        """The broker connection the consumer reads with, on ordered_tasks' transport for Redis.

        Its channels requeue at the head, and the task channel fetches
        reliably once the ``Leases`` step turns it on.
        """
        return self.ensure_connected(self.app.connection_for_read(
            heartbeat=heartbeat, transport=ordered_transport(self.app)))

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            if (state.should_stop or state.should_terminate) and _is_amqp(self):
                # Shutting down: left unacknowledged, RabbitMQ gives it back in its
                # place to the next consumer when this connection closes.
                return None
            if self._unordered_task(message):
                return None
            return handle(message)

        return on_task_received

    def _unordered_task(self, message: Any) -> bool:
        """Park a message of a partition queue whose task is not ordered, instead of running it.

        Such a task would run without the guard: nothing would hold its key
        when it fails. A producer that is not ordered_tasks' own sent it.
        """
        headers = message.headers if isinstance(message.headers, dict) else {}
        name = headers.get("task")
        if not isinstance(name, str):
            return False
        task = self.app.tasks.get(name)
        if task is None or key_spec_for(self.app, name, task) is not None:
            return False
        return hand_over(self.pool, message, Reason.INVALID,
                         f"{name} is not an ordered task: declare its key with @ordered_task or "
                         "ORDERED_TASKS['ROUTES'], or send it to a queue that is not a partition's.")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        if not hand_over(self.pool, message, Reason.UNKNOWN_TASK, f"No task named {exc} is registered."):
            super().on_unknown_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if not hand_over(self.pool, message, Reason.INVALID, "Not a Celery task message."):
            super().on_unknown_message(body, message)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if not hand_over(self.pool, message, Reason.INVALID, repr(exc)):
            super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        if not hand_over(self.pool, message, Reason.UNDECODABLE, repr(exc)):
            super().on_decode_error(message, exc)


class Leases(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: on Redis, consume only the partitions whose lease this worker holds.

    A second worker started for the same partitions holds no lease and waits
    as a standby; it takes a partition over within seconds of its owner
    stopping or dying. Kombu's restore of unacknowledged messages at
    shutdown (to the back of the queue) is turned off: the next owner puts
    them back at the head instead; any other requeue also goes to the head.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.tref: Any = None
        self.wake: Any = None

    def start(self, c: Any) -> None:
        global _keeper
        partitions = ORDERED_APPS.get(c.app)
        if partitions is None or c.connection.transport.driver_type != "redis":
            return
        conf = get_settings()
        if _keeper is None:
            client = coordination_client(c.app)
            if client is None:  # a Redis broker always gives one
                raise ConfigurationError("ordered workers on Redis need a coordination Redis")
            keeper = _keeper = LeaseKeeper(client, conf.queue_prefix, partitions)
            signals.worker_shutdown.connect(lambda **_: keeper.release_all(), weak=False)
        self.wake = start_fetching_reliably(c.task_consumer.channel, c.timer)
        # The reliable fetch takes at most one message per partition queue;
        # kombu's BRPOP does not, so it gets one message in all.
        c.qos.value = len(partitions) if self.wake is not None else 1
        c.qos.update()
        for partition in partitions:  # nothing until the leases say so, also after a reconnect
            c.task_consumer.cancel_by_queue(partition_queue(conf.queue_prefix, partition).name)
        _keeper.consuming.clear()
        _keeper.acquiring = True
        _keeper.start()
        _keeper.apply(c)
        self.tref = c.timer.call_repeatedly(LEASE_TICK / 2, _keeper.apply, (c,), priority=10)

    def stop(self, c: Any) -> None:
        if _keeper is not None:
            _keeper.stop_acquiring()
        for tref in (self.tref, self.wake):
            if tref is not None:
                tref.cancel()
        self.tref = self.wake = None
