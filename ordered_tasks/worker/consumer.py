"""Celery's consumer, parking the messages of partition queues that it would drop."""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery import Celery, bootsteps, signals
from celery.worker import state
from celery.worker.consumer import Consumer
from kombu.transport import pyamqp, resolve_transport
from kombu.transport import redis as kombu_redis
from kombu.utils.imports import symbol_by_name

from ..conf import get_settings
from ..coordination import coordination_client
from ..exceptions import ConfigurationError
from ..models import ParkedMessage
from ..queues import partition_queue
from ..routing import key_spec_for
from .exclusivity import rabbitmq
from .exclusivity.leases import LEASE_TICK, LeaseKeeper
from .exclusivity.rabbitmq import consume_declarable_queues
from .failures.book import BOOK
from .failures.spill import spill_over
from .failures.unrunnable import hand_over, partition_of_message
from .health import metrics
from .health.figures import FIGURES
from .redelivery.ledger import acknowledged_here
from .sequencing.claims import CLAIMS, runs_in_process
from .sequencing.handoff import LOOP
from .sequencing.window import SPILL, admit, hand_back_in_place
from .setup import ordered_worker
from .transport.fetch import start_fetching_reliably
from .transport.transport import RedisTransport, SentinelTransport

Reason = ParkedMessage.Reason
logger = logging.getLogger(__name__)


def _still_running_here(message: Any) -> bool:
    """Whether a copy of ``message`` (its task id) still runs in this worker, or waits in its pool.

    A worker frozen past its lease that gets the lease back puts what it
    held back at the head of the queue, and fetches it again, while the task
    it had handed to its pool may not have finished yet, or not even begun
    (a pool's queue, a retry's wake-up that came due as the worker woke):
    the copy must not run beside it. Celery counts a request as reserved
    from when it goes to the pool, and as active once it began, until it is
    done.
    """
    headers = message.headers if isinstance(message.headers, dict) else {}
    task_id = headers.get("id")
    request = state.requests.get(task_id) if isinstance(task_id, str) else None
    return request is not None and (request in state.active_requests or request in state.reserved_requests)


def _is_amqp(consumer: Any) -> bool:
    connection = getattr(consumer, "connection", None)
    return connection is not None and connection.transport.driver_type == "amqp"


def ordered_transport(app: Celery) -> str | None:
    """The transport an ordered worker of ``app`` consumes with (its dotted path), or None for kombu's own."""
    return _ordered_transport_of(app.connection_for_read())


def _ordered_transport_of(connection: Any) -> str | None:
    """ordered_tasks' subclass of the transport kombu chose for ``connection``, as a dotted path.

    Kombu's Redis, Sentinel and py-amqp transports each have one. A path
    rather than the class, so that ``inspect stats`` can show it.
    """
    name: Any = connection.transport_cls
    cls: type = name if isinstance(name, type) else symbol_by_name(resolve_transport(name) or name)
    if issubclass(cls, (RedisTransport, SentinelTransport, rabbitmq.Transport, rabbitmq.SSLTransport)):
        return f"{cls.__module__}:{cls.__qualname__}"
    if issubclass(cls, pyamqp.SSLTransport):
        return f"{rabbitmq.__name__}:SSLTransport"
    if issubclass(cls, pyamqp.Transport):
        return f"{rabbitmq.__name__}:Transport"
    if issubclass(cls, kombu_redis.SentinelTransport):
        return f"{SentinelTransport.__module__}:SentinelTransport"
    if issubclass(cls, kombu_redis.Transport):
        return f"{RedisTransport.__module__}:RedisTransport"
    return None


def ordered_connection(connection: Any, heartbeat: float | None = None) -> Any:
    """``connection`` (not yet connected) on ordered_tasks' transport, with all its other settings.

    A copy rather than a new connection from the app's settings, so that
    what kombu derived from the URL stays: the TLS default of ``rediss://``
    and ``amqps://``, and the alternates of a failover URL list.
    """
    transport = _ordered_transport_of(connection)
    if transport is None or connection.transport_cls == transport:
        return connection
    ordered = connection.clone(transport=transport, heartbeat=heartbeat)
    connection.release()
    return ordered


class OrderedConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer for partition queues.

    It parks unknown, invalid and undecodable messages instead of dropping
    them, and on RabbitMQ hands a partition over to a standby only after
    its running task is acknowledged.
    """

    #: The lease keeper of this worker (Redis broker only; made by the ``Leases`` step).
    keeper: LeaseKeeper | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        setup = ordered_worker(self.app)
        if setup is not None:
            setup.consumer = self  # how requests and the figures find the worker's state

    def connect(self) -> Any:
        """Connect for a new tenure of the partitions; on RabbitMQ, consume only declarable queues.

        Called at every (re)connection, before Celery's ``Tasks`` step
        starts the task consumer. Another worker may have had the
        partitions meanwhile, so what this worker remembers of them is
        stale. On RabbitMQ the channels of :mod:`.exclusivity.rabbitmq`
        apply a prefetch limit of ``WINDOW`` per partition queue, which
        Celery reports as the consumer's prefetch count.
        """
        connection = super().connect()
        BOOK.new_tenure()
        FIGURES.new_tenure()
        if connection.transport.driver_type == "amqp":
            metrics.connection_replaced()  # RabbitMQ may have made a standby the active consumer
            if BOOK.versions is not None:
                BOOK.versions.end_tenures()  # nothing the lost connection delivered starts now
            self.initial_prefetch_count = get_settings().window
            consume_declarable_queues(self.app, connection)
        return connection

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """The broker connection was lost: on RabbitMQ, nothing it delivered starts from now on.

        RabbitMQ gives its unacknowledged messages back to their queues and
        may make standbys the active consumers; the tasks still in the
        pool's queue, and a replay running there, see that their tenure
        ended (see ``failures.entry.refuse_from_a_lost_connection``). Again
        at the reconnection, in :meth:`connect`.
        """
        if _is_amqp(self) and BOOK.versions is not None:
            BOOK.versions.end_tenures()
        super().on_connection_error_after_connected(exc)

    def connection_for_read(self, heartbeat: float | None = None) -> Any:
        """The broker connection the consumer reads with, on one of ordered_tasks' transports.

        On Redis its channels requeue at the head, and the task channel
        fetches reliably once the ``Leases`` step turns it on; on RabbitMQ
        they keep one unacknowledged message per partition queue and never
        cancel a partition queue's consumer. Also after a failover to an
        alternate URL of ``broker_url`` (``redis://a;redis://b``).
        """
        connection = self.ensure_connected(
            ordered_connection(self.app.connection_for_read(heartbeat=heartbeat), heartbeat))
        ordered = ordered_connection(connection, heartbeat)
        if ordered is not connection:
            # kombu's failover to an alternate broker URL takes the transport from its scheme.
            logger.info("Failed over to %s; consuming with ordered_tasks' transport again.",
                        ordered.as_uri())
            connection = self.ensure_connected(ordered)
        return connection

    def cancel_task_queue(self, queue: Any) -> None:
        """The ``cancel_consumer`` remote control command: refused for a partition queue.

        The partition's order depends on this worker consuming it until it
        stops (on RabbitMQ a cancel would promote a standby while this worker
        still holds a message; on Redis the lease decides). Stop the worker
        instead, or start it for other partitions.
        """
        name = getattr(queue, "name", queue)
        if isinstance(name, str) and get_settings().partition_of_queue(name) is not None:
            logger.warning("Not cancelling the consumer of partition queue %s: an ordered worker consumes "
                           "its partitions until it stops. Stop the worker, or run it for other "
                           "partitions, instead.", name)
            return
        super().cancel_task_queue(queue)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's handler, with each message of a partition queue started by its key's lane.

        Called on the event loop's thread as the loop starts (again, after a
        reconnection): pool threads hand starts to this loop.
        """
        handle = super().create_task_handler(*args, **kwargs)
        LOOP.attach(getattr(self, "hub", None))
        CLAIMS.enabled = runs_in_process(getattr(self, "pool", None))  # a spill may take a queued task
        acknowledged_here()  # tasks run in this process note their completions until acknowledged
        SPILL.handler = functools.partial(spill_over, self)

        def start(message: Any) -> Any:
            if self._unordered_task(message):
                return None
            if _still_running_here(message) and hand_back_in_place(self, message):
                return None  # its copy finishes first; then the ledger recognises this one
            return handle(message)

        def on_task_received(message: Any) -> Any:
            if (state.should_stop or state.should_terminate) and _is_amqp(self):
                # Shutting down: left unacknowledged, RabbitMQ gives it back in its
                # place to the next consumer when this connection closes.
                return None
            partition = partition_of_message(message)
            if partition is not None and admit(self, message, partition, lambda: start(message)):
                return None  # its key's lane starts it
            return start(message)

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
        return hand_over(self, message, Reason.INVALID,
                         f"{name} is not an ordered task: declare its key with @ordered_task or "
                         "ORDERED_TASKS['ROUTES'], or send it to a queue that is not a partition's.")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        if not hand_over(self, message, Reason.UNKNOWN_TASK, f"No task named {exc} is registered."):
            super().on_unknown_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if not hand_over(self, message, Reason.INVALID, "Not a Celery task message."):
            super().on_unknown_message(body, message)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if not hand_over(self, message, Reason.INVALID, repr(exc)):
            super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        if not hand_over(self, message, Reason.UNDECODABLE, repr(exc)):
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
        setup = ordered_worker(c.app)
        if setup is None or c.connection.transport.driver_type != "redis":
            return
        partitions = setup.partitions
        conf = get_settings()
        keeper = c.keeper
        if keeper is None:
            client = coordination_client(c.app)
            if client is None:  # a Redis broker always gives one
                raise ConfigurationError("ordered workers on Redis need a coordination Redis")
            keeper = c.keeper = LeaseKeeper(client, conf.queue_prefix, partitions, on_tenure=BOOK.new_tenure)
            signals.worker_shutdown.connect(lambda **_: keeper.release_all(), weak=False)
        self.wake = start_fetching_reliably(c.task_consumer.channel, c.timer, conf.window)
        # The reliable fetch takes at most a window of messages per partition queue;
        # kombu's BRPOP does not, so it gets one message in all.
        c.qos.value = len(partitions) * conf.window if self.wake is not None else 1
        c.qos.update()
        for partition in partitions:  # nothing until the leases say so, also after a reconnect
            c.task_consumer.cancel_by_queue(partition_queue(conf.queue_prefix, partition).name)
        keeper.consuming.clear()
        keeper.acquiring = True
        keeper.start()
        keeper.apply(c)
        self.tref = c.timer.call_repeatedly(LEASE_TICK / 2, keeper.apply, (c,), priority=10)

    def stop(self, c: Any) -> None:
        if c.keeper is not None:
            c.keeper.stop_acquiring()
        for tref in (self.tref, self.wake):
            if tref is not None:
                tref.cancel()
        self.tref = self.wake = None
