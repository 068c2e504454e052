"""Replay and skip: control messages published into the key's own partition queue."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery import Celery, Task

from .decorators import ordered_task
from .exceptions import KeyNotBlockedError, UnknownKeyError
from .options import CONTROL_TASK
from .partitioning import canonical_key
from .task import OrderedTaskMixin

if TYPE_CHECKING:
    from .models import ControlRequest

logger = logging.getLogger(__name__)

REPLAY = "replay"
SKIP = "skip"
WAKE = "wake"


@ordered_task(key="key", name=CONTROL_TASK, bind=True, ignore_result=True, ordered_control=True)
def control(self: Task[Any, Any], key: str, action: str, request_id: int | None = None,
            due: str | None = None) -> str:
    """Apply a replay, skip or retry wake-up to ``key``, on its partition's consumer."""
    from .worker.failures.control import apply_control
    from .worker.failures.guard import requeue_unless_stored

    with requeue_unless_stored(f"control message {action} for key {key!r}"):
        return apply_control(self.app, key, action, request_id, due)


def _app(app: Celery | None) -> Celery:
    if app is not None:
        return app
    from .celery_app import find_celery_app

    return find_celery_app(None)


def publish_control(app: Celery, key: str, action: str, request_id: int | None = None,
                    eta: datetime | None = None, due: datetime | None = None) -> None:
    """Publish one control message into the partition queue of ``key``."""
    task: Any = app.tasks[CONTROL_TASK]
    kwargs = {"key": key, "action": action, "request_id": request_id,
              "due": due.isoformat() if due is not None else None}
    options = task.publish_options((), kwargs, {})
    if eta is not None:
        options["eta"] = eta
    super(OrderedTaskMixin, task).apply_async((), kwargs, **options)


def publish_wake(app: Celery, key: str, due_at: datetime) -> None:
    """Have the consumer look at ``key`` again at ``due_at`` (an in-place retry is due)."""
    publish_control(app, key, WAKE, eta=due_at, due=due_at)


def _request(action: str, key: object, requested_by: str, app: Celery | None) -> ControlRequest:
    from django.db import transaction

    from .models import ACTIVE, AccountState, ControlRequest

    canonical = canonical_key(key)
    state = AccountState.objects.filter(key=canonical).first()
    if state is None:
        raise UnknownKeyError(
            f"No ordered task of key {canonical!r} has ever failed, so there is nothing to "
            f"{action}. Check the key (it is compared as a string)."
        )
    if state.status == ACTIVE:
        raise KeyNotBlockedError(
            f"Key {canonical!r} is active: it has no failed message to {action}. "
            "Nothing was done."
        )
    request = ControlRequest.objects.create(key=canonical, action=action, requested_by=requested_by,
                                            epoch=state.epoch)
    celery_app = _app(app)
    transaction.on_commit(lambda: publish_control(celery_app, canonical, action, request.pk))
    logger.info("%s of key %r requested by %s", action, canonical, requested_by or "unknown")
    return request


def replay(key: object, *, requested_by: str = "", app: Celery | None = None) -> ControlRequest:
    """Run the parked messages of a blocked (or retrying) key again, in their order.

    Asynchronous: the key's partition consumer applies it when it reaches the
    control message, after every message published before it. The key becomes
    active when all parked messages succeed; at the first failure it is
    blocked again with the rest still parked. A repeated request for the same
    incident does nothing. Raises :class:`~ordered_tasks.UnknownKeyError` or
    :class:`~ordered_tasks.KeyNotBlockedError` when there is nothing to replay.
    """
    return _request(REPLAY, key, requested_by, app)


def skip(key: object, *, requested_by: str = "", app: Celery | None = None) -> ControlRequest:
    """Set aside the failed head message of a blocked key (kept as a record), then run the rest.

    Same rules as :func:`replay`.
    """
    return _request(SKIP, key, requested_by, app)
