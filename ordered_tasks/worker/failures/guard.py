"""The worker side of an ordered task: held keys, in-place retries and failure policies."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore, Reject, Retry
from django.db import DatabaseError
from django.utils import timezone

from ...exceptions import StaleOwnerError
from ...messages import publish_wake
from ...models import AccountState
from ...options import KEY_HEADER, PARTITION_HEADER
from ...states import KeyStatus
from ..delivery import NO_KEY, RERUN_ENTRY, Delivery
from ..health import metrics
from ..redelivery.ledger import Ledger, ledger_for
from ..sequencing.claims import CLAIMS, Begin
from . import store
from .book import BOOK
from .placement import Misfit, place
from .retry import InPlaceRetry, Parked, seconds_until

if TYPE_CHECKING:
    from ...models import ParkedMessage

logger = logging.getLogger(__name__)
#: Seconds to wait before returning a message that could not be parked.
REQUEUE_PAUSE = 1.0


class Outcome(str, Enum):
    """How running a parked message again went."""

    NOT_RUN = "not run"
    OK = "ok"
    #: It failed under the ``continue`` policy, or was set aside (revoked): the next one runs.
    CONTINUED = "continued"
    RETRYING = KeyStatus.RETRYING.value
    BLOCKED = KeyStatus.BLOCKED.value
    #: Not started: this worker's lease of the partition may have lapsed.
    HANDED_BACK = "handed back"

    def __str__(self) -> str:
        return self.value


@dataclass
class Replaying:
    """A parked message being run again by the consumer, and how that went."""

    row: ParkedMessage
    outcome: Outcome = Outcome.NOT_RUN


#: Set while the consumer runs a parked message (the key is held, yet it must run).
REPLAYING: ContextVar[Replaying | None] = ContextVar("ordered_tasks_replaying", default=None)


def run_guarded(task: Any, request: Any, args: Any, kwargs: Any) -> Any:
    """Run one message of an ordered task on its partition's consumer."""
    replaying = REPLAYING.get()
    if replaying is not None and replaying.row.task_id != request.id:
        replaying = None
    # A message that may have a claim is one whose key header agrees with its arguments.
    begin = CLAIMS.begin(request.id, getattr(request, KEY_HEADER, None)) if replaying is None else Begin.RUN
    if begin is Begin.PARKED:
        raise Parked("parked with its key's waiting messages, ahead of them, before it began")
    if replaying is not None:
        key, partition = replaying.row.key, replaying.row.partition
    else:
        key, partition = _place(task, request, args, kwargs)
    ledger = ledger_for(task.app) if replaying is None else None
    if replaying is None:
        with requeue_unless_stored(f"message {request.id}"):
            if ((_is_redelivery(request) or begin is Begin.CHECK)
                    and _handled_before(ledger, request, key, partition)):
                raise Ignore("already handled: a redelivered copy")
            held = BOOK.status(key, partition) != KeyStatus.ACTIVE
            if held:
                store.park_held(Delivery.from_request(task, request, args, kwargs))
        if held:
            raise Parked(f"parked: key {key!r} is held by an earlier message")
    started = time.monotonic()
    try:
        try:
            result = task.run(*args, **kwargs)
        except Retry as plain:
            if isinstance(plain, InPlaceRetry):
                raise
            task.retry(exc=plain.exc, countdown=seconds_until(plain.when))
        finally:
            metrics.task_ran(partition, time.monotonic() - started)
    except Ignore:  # the task ended itself (``Task.replace`` raises it once the replacement is sent)
        if replaying is not None:
            replaying.outcome = Outcome.OK
        elif ledger is not None:
            ledger.record(partition, request.id)  # a redelivered copy must not run it again
        raise
    except InPlaceRetry as retry:
        with requeue_unless_stored(f"message {request.id}"):
            _retry(task, request, args, kwargs, key, partition, retry, replaying)
        raise
    except Exception as exc:
        with requeue_unless_stored(f"message {request.id}"):
            _fail(task, request, args, kwargs, key, partition, exc, replaying)
        if isinstance(exc, Reject):
            raise Ignore(f"rejected, and parked: {exc}") from exc
        raise
    if replaying is not None:
        replaying.outcome = Outcome.OK
    elif ledger is not None:
        ledger.record(partition, request.id)
        if not (task.ignore_result or getattr(request, "ignore_result", False)):
            # The result backend's write follows: a noted completion would wait for it too.
            ledger.send_noted()
    metrics.count(partition, metrics.SUCCEEDED)
    return result


def _place(task: Any, request: Any, args: Any, kwargs: Any) -> tuple[str, int]:
    """The message's key and partition (now also in its headers); a misfit is parked instead."""
    try:
        placed = place(task, request, args, kwargs)
    except Misfit as misfit:
        logger.error("Parking message %s of %s (%s): %s", request.id, task.name, misfit.reason, misfit.error)
        delivery = Delivery.from_request(task, request, args, kwargs, misfit.key, misfit.partition)
        with requeue_unless_stored(f"message {request.id}"):
            park_misfit(delivery, misfit.reason, misfit.error)
        raise Parked(f"parked: {misfit.error}") from None
    setattr(request, KEY_HEADER, placed.key)
    setattr(request, PARTITION_HEADER, placed.partition)
    return placed.key, placed.partition


def park_misfit(delivery: Delivery, reason: str, error: str) -> None:
    """Park a message that cannot run in its place: it blocks its key, or is kept as a record."""
    if delivery.key == NO_KEY:
        store.refuse(delivery, reason, error)
        return
    was = BOOK.status(delivery.key, delivery.partition)
    state = store.park_unrunnable(delivery, reason, error)
    if was == KeyStatus.ACTIVE and state.status == KeyStatus.BLOCKED:
        announce_blocked(delivery.key, delivery.partition, delivery.task_name, delivery.task_id, error,
                         reason)
    else:
        BOOK.set(delivery.key, delivery.partition, state.status)


def _is_redelivery(request: Any) -> bool:
    delivery_info = getattr(request, "delivery_info", None) or {}
    return bool(delivery_info.get("redelivered") or getattr(request, RERUN_ENTRY, False))


def _handled_before(ledger: Ledger | None, request: Any, key: str, partition: int) -> bool:
    """A redelivered message already ran to the end, or was already parked."""
    from ...models import ParkedMessage

    if ledger is not None and ledger.completed(partition, request.id):
        return True
    return ParkedMessage.objects.filter(key=key, task_id=request.id).exists()


@contextmanager
def requeue_unless_stored(what: str) -> Iterator[None]:
    """If the database write fails, hand the message back to the broker instead of losing it.

    A stale owner (it lost its partition's lease) hands the message back too,
    and never acknowledges it: the partition's new owner restored it to the
    head of the queue and may hold it under the same delivery tag, so an
    acknowledgement would delete the new owner's unacknowledged record,
    while handing back is a no-op once the record moved (or a redelivered
    copy the completion ledger recognises).
    """
    try:
        yield
    except StaleOwnerError as exc:
        logger.warning("Not changing key state for %s, handing it back: %s", what, exc)
        raise Reject(str(exc), requeue=True) from exc
    except DatabaseError as exc:
        logger.critical("Could not store %s (%r); returning it to its queue.", what, exc)
        time.sleep(REQUEUE_PAUSE)  # do not spin on a database outage
        raise Reject(exc, requeue=True) from exc


def _retry(task: Any, request: Any, args: Any, kwargs: Any, key: str, partition: int,
           retry: InPlaceRetry, replaying: Replaying | None) -> None:
    retries = int(request.retries or 0) + 1
    due_at = timezone.now() + timedelta(seconds=retry.countdown)
    if retry.exc is not None:
        error, trace = store.describe(retry.exc)
    else:
        error, trace = "retry requested", ""
    changed = retry.new_args is not None or retry.new_kwargs is not None
    args = args if retry.new_args is None else retry.new_args
    kwargs = kwargs if retry.new_kwargs is None else retry.new_kwargs
    if replaying is not None:
        body = Delivery.from_request(task, request, args, kwargs).body if changed else None
        store.schedule_retry(key, partition, due_at=due_at, row=replaying.row, error=error, trace=trace,
                             attempts=replaying.row.attempts + 1, retries=retries, body=body)
        replaying.outcome = Outcome.RETRYING
    else:
        delivery = Delivery.from_request(task, request, args, kwargs)
        store.schedule_retry(key, partition, due_at=due_at, delivery=delivery, error=error,
                             trace=trace, attempts=retries, retries=retries)
    BOOK.set(key, partition, KeyStatus.RETRYING)
    metrics.count(partition, metrics.RETRIED)
    publish_wake(task.app, key, due_at)


def _fail(task: Any, request: Any, args: Any, kwargs: Any, key: str, partition: int,
          exc: BaseException, replaying: Replaying | None) -> None:
    error, trace = store.describe(exc)
    if replaying is not None:
        where: dict[str, Any] = {"row": replaying.row}
        attempts = replaying.row.attempts + 1
    else:
        where = {"delivery": Delivery.from_request(task, request, args, kwargs)}
        attempts = int(request.retries or 0) + 1
    if task.failure_policy == "continue":
        store.record_failure(key, partition, error=error, trace=trace, attempts=attempts, **where)
        metrics.count(partition, metrics.FAILED)
        if replaying is not None:
            replaying.outcome = Outcome.CONTINUED
        return
    store.block(key, partition, error=error, trace=trace, attempts=attempts, **where)
    metrics.count(partition, metrics.FAILED)
    if replaying is not None:
        replaying.outcome = Outcome.BLOCKED
    announce_blocked(key, partition, task.name, request.id, error, store.Reason.FAILED)


def announce_blocked(key: str, partition: int, task_name: str, task_id: str, error: str,
                     reason: str) -> None:
    """The key was just blocked in the database: remember it and send ``key_blocked``."""
    from ...signals import key_blocked

    BOOK.set(key, partition, KeyStatus.BLOCKED)
    key_blocked.send(sender=AccountState, key=key, partition=partition, task_name=task_name,
                     task_id=task_id, exception=error, reason=reason)
