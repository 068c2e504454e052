"""Celery's consumer, parking the messages of partition queues that it would drop."""

from __future__ import annotations

import weakref
from types import MethodType
from typing import Any

from celery.worker import state
from celery.worker.consumer import Consumer
from celery.worker.consumer.tasks import Tasks

from ..models import ParkedMessage
from .unrunnable import hand_over

Reason = ParkedMessage.Reason
_current: weakref.ref[OrderedConsumer] | None = None


def current_pool() -> Any:
    """The pool of this worker's consumer, or None outside an ordered worker."""
    consumer = _current() if _current is not None else None
    return consumer.pool if consumer is not None else None


def _is_amqp(consumer: Any) -> bool:
    connection = getattr(consumer, "connection", None)
    return connection is not None and connection.transport.driver_type == "amqp"


def _stop_tasks_step(step: Tasks, c: Any) -> None:
    """Stop of Celery's ``Tasks`` step, except that a RabbitMQ consumer is not cancelled.

    Cancelling makes RabbitMQ promote a standby consumer of the
    single-active-consumer queue at once, while this worker still runs (and
    has not acknowledged) its task: the standby could start the next message
    of the partition. Without the cancel, the handover happens when the
    connection closes, after the running task has been acknowledged.
    """
    if _is_amqp(c):
        return
    Tasks.stop(step, c)


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
                step.stop = MethodType(_stop_tasks_step, step)  # type: ignore[method-assign]

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            if (state.should_stop or state.should_terminate) and _is_amqp(self):
                # Shutting down: left unacknowledged, RabbitMQ gives it back in its
                # place to the next consumer when this connection closes.
                return None
            return handle(message)

        return on_task_received

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
