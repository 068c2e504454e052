"""Last check on every message bound for a partition queue, just before it is sent."""

from __future__ import annotations

import time
from typing import Any, Callable

from celery import Celery
from kombu import Queue

from .canvas import check_canvas
from .conf import get_settings
from .exceptions import UnsafeOptionError
from .options import CONTROL_TASK, KEY_HEADER, PARTITION_HEADER, PUBLISHED_HEADER
from .partitioning import partition_of
from .redisclient import reused_client
from .routing import key_spec_for


class PublishGuard:
    """Wraps ``app.amqp.send_task_message``: stamps key headers, refuses unsafe messages.

    Routing has already chosen the queue; this sees what the router cannot
    (``countdown``, ``eta`` and ``expires`` of ``app.send_task``) and any
    message aimed at a partition queue by hand.
    """

    def __init__(self, app: Celery, send: Callable[..., Any]) -> None:
        self.app = app
        self.send = send

    def __call__(self, producer: Any, name: str, message: Any, *args: Any,
                 queue: Any = None, headers: dict[str, Any] | None = None,
                 **kwargs: Any) -> Any:
        qname = queue.name if isinstance(queue, Queue) else queue
        body = message.body
        if isinstance(body, tuple) and len(body) == 3:
            check_canvas(self.app, name, body[2])
        conf = get_settings()
        partition = conf.partition_of_queue(qname) if isinstance(qname, str) else None
        if partition is None:
            return self.send(producer, name, message, *args, queue=queue, headers=headers, **kwargs)
        headers = self._checked_headers(name, message, qname, partition, headers, conf.partitions)
        with reused_client(getattr(producer, "channel", None)):
            return self.send(producer, name, message, *args, queue=queue, headers=headers, **kwargs)

    def _checked_headers(self, name: str, message: Any, qname: str, partition: int,
                         headers: dict[str, Any] | None, partitions: int) -> dict[str, Any]:
        message_headers = message.headers
        for option in ("eta", "expires"):
            if option == "eta" and name == CONTROL_TASK:
                continue  # a retry wake-up: the control message itself is not ordered work
            if message_headers.get(option) is not None:
                raise UnsafeOptionError(
                    f"{name} is bound for the ordered queue {qname} with {option} set. "
                    "Delayed or expiring messages break per-key order: publish the "
                    "task when it is due, without countdown, eta or expires."
                )
        key = (headers or {}).get(KEY_HEADER)
        if key is None:
            spec = key_spec_for(self.app, name)
            if spec is None:
                raise UnsafeOptionError(
                    f"{name} is not an ordered task but is being sent to the ordered "
                    f"queue {qname}. Decorate it with @ordered_task, declare its key in "
                    "ORDERED_TASKS['ROUTES'], or send it to another queue."
                )
            body = message.body
            if not isinstance(body, tuple):
                raise UnsafeOptionError("ordered_tasks needs Celery's task protocol 2 (the default).")
            key = spec.canonical(body[0], body[1])
        expected = partition_of(key, partitions)
        if expected != partition:
            raise UnsafeOptionError(
                f"{name} with key {key!r} belongs to partition {expected}, not to the "
                f"queue {qname}. Do not choose the queue of an ordered task yourself."
            )
        return {**(headers or {}), KEY_HEADER: key, PARTITION_HEADER: partition,
                PUBLISHED_HEADER: round(time.time(), 3)}
