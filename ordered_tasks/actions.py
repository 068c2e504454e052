"""Replay and skip, the operator's actions: checked against the key's state, recorded, then published."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from celery import Celery

from .exceptions import KeyNotBlockedError, UnknownKeyError
from .messages import publish_control
from .partitioning import canonical_key
from .states import ControlAction, KeyStatus

if TYPE_CHECKING:
    from .models import ControlRequest

logger = logging.getLogger(__name__)


def _app(app: Celery | None) -> Celery:
    if app is not None:
        return app
    from .celery_app import find_celery_app

    return find_celery_app(None)


def _request(action: ControlAction, key: object, requested_by: str, app: Celery | None) -> ControlRequest:
    from django.db import transaction

    from .models import AccountState, ControlRequest

    canonical = canonical_key(key)
    state = AccountState.objects.filter(key=canonical).first()
    if state is None:
        raise UnknownKeyError(
            f"No ordered task of key {canonical!r} has ever failed, so there is nothing to "
            f"{action}. Check the key (it is compared as a string)."
        )
    if state.status == KeyStatus.ACTIVE:
        raise KeyNotBlockedError(
            f"Key {canonical!r} is active: it has no failed message to {action}. "
            "Nothing was done."
        )
    request = ControlRequest.objects.create(key=canonical, action=action.value, requested_by=requested_by,
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
    return _request(ControlAction.REPLAY, key, requested_by, app)


def skip(key: object, *, requested_by: str = "", app: Celery | None = None) -> ControlRequest:
    """Set aside the failed head message of a blocked key (kept as a record), then run the rest.

    Same rules as :func:`replay`.
    """
    return _request(ControlAction.SKIP, key, requested_by, app)
