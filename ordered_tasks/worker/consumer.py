"""Celery's consumer, parking the messages of partition queues that it would drop."""

from __future__ import annotations

import weakref
from typing import Any

from celery.worker.consumer import Consumer

from ..models import ParkedMessage
from .unrunnable import hand_over

Reason = ParkedMessage.Reason
_current: weakref.ref[OrderedConsumer] | None = None


def current_pool() -> Any:
    """The pool of this worker's consumer, or None outside an ordered worker."""
    consumer = _current() if _current is not None else None
    return consumer.pool if consumer is not None else None


class OrderedConsumer(Consumer):  # type: ignore[misc]
    """Parks unknown, invalid and undecodable messages of partition queues instead of dropping them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        global _current
        super().__init__(*args, **kwargs)
        _current = weakref.ref(self)

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
