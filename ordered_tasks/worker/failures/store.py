"""Database writes of the consumer: parking messages and changing key states."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from ...exceptions import StaleOwnerError
from ...models import AccountState, ParkedMessage, PartitionFence, locked_row
from ...states import KeyStatus
from ..delivery import Delivery
from ..exclusivity.fencing import FENCE
from ..health import metrics
from .bulk import insert_parked, parked_ids

PARKED = ParkedMessage.State.PARKED
Reason = ParkedMessage.Reason


def describe(exc: BaseException) -> tuple[str, str]:
    """A one-line description of ``exc`` and its formatted traceback."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


@contextmanager
def fenced(partition: int) -> Iterator[None]:
    """A transaction in which this consumer may change ``partition``'s keys and parked rows.

    With a fencing token (Redis leases), a stale owner gets
    :class:`~ordered_tasks.exceptions.StaleOwnerError` before anything is written.
    """
    with transaction.atomic():
        fence = FENCE.get()
        if fence is not None:
            check_fence(partition, fence)
        yield


def delete_parked(row: ParkedMessage) -> None:
    """Delete a parked message that ran (fenced)."""
    with fenced(row.partition):
        row.delete()


def locked_state(key: str, partition: int) -> AccountState:
    """The key's state row, created if needed and locked until the transaction ends.

    With a fencing token (Redis leases), the partition's fence is checked
    first: a stale owner gets :class:`~ordered_tasks.exceptions.StaleOwnerError`.
    """
    fence = FENCE.get()
    if fence is not None:
        check_fence(partition, fence)
    state: AccountState = locked_row(AccountState, {"key": key}, {"partition": partition})
    return state


def check_fence(partition: int, fence: int) -> None:
    """Refuse ``fence`` if a newer owner of ``partition`` has written; else record it."""
    newer = PartitionFence.advance(partition, fence)
    if newer is not None:
        metrics.count(partition, metrics.FENCE_REFUSED)
        raise StaleOwnerError(
            f"Partition {partition} has a newer owner (fence {newer} > {fence}); "
            "this worker lost its lease and must not change its keys."
        )


def _new_values(account: AccountState, delivery: Delivery, **fields: Any) -> dict[str, Any]:
    """The field values of the key's next parked row (the other fields take their defaults)."""
    account.sequence += 1
    return {
        "key": delivery.key, "partition": delivery.partition, "position": account.sequence,
        "task_name": delivery.task_name[:255], "task_id": delivery.task_id[:255], "body": delivery.body,
        "content_type": delivery.content_type, "content_encoding": delivery.content_encoding,
        "headers": delivery.headers, **fields,
    }


def _new_row(account: AccountState, delivery: Delivery, **fields: Any) -> ParkedMessage:
    """The next parked row of the key (not saved yet)."""
    return ParkedMessage(**_new_values(account, delivery, **fields))


def _add_row(account: AccountState, delivery: Delivery, **fields: Any) -> ParkedMessage:
    row = _new_row(account, delivery, **fields)
    row.save(force_insert=True)
    if row.state == PARKED:  # not a record (failed under 'continue', revoked, refused)
        _count_parked(row.partition, row.reason)
    return row


def _count_parked(partition: int, reason: str, messages: int = 1) -> None:
    """Count parked messages for the metrics once they are stored (the transaction committed)."""
    if metrics.TALLY.enabled:
        transaction.on_commit(lambda: metrics.parked(partition, reason, messages))


def _put(account: AccountState, row: ParkedMessage | None, delivery: Delivery | None,
         **fields: Any) -> None:
    """Update the parked ``row`` with ``fields``, or park ``delivery`` as a new row with them."""
    if row is not None:
        for name, value in fields.items():
            setattr(row, name, value)
        row.save()
    elif delivery is not None:
        _add_row(account, delivery, **fields)


def park_held(delivery: Delivery) -> None:
    """Park a message because an earlier message of its key is blocked or retrying."""
    with transaction.atomic():
        state = locked_state(delivery.key, delivery.partition)
        _add_row(state, delivery, reason=Reason.KEY_HELD)
        state.save(update_fields=["sequence", "updated_at"])


def spill(key: str, partition: int, deliveries: list[Delivery],
          before_write: Callable[[], None] | None = None) -> tuple[AccountState, bool]:
    """Park a crowded key's waiting messages, in order, behind its parked ones; hold the key.

    An active key becomes retrying, due now, until its parked messages ran
    (returns True then: the caller publishes its wake-up). A message still
    parked under the same task id is not parked twice. ``before_write``
    runs with the key's row locked, and may raise to write nothing.
    """
    with transaction.atomic():
        state = locked_state(key, partition)
        if before_write is not None:
            before_write()
        known = parked_ids(key, [d.task_id for d in deliveries if d.task_id])
        parked = insert_parked([  # one statement for the batch
            _new_values(state, delivery, reason=Reason.OVERFLOW) for delivery in deliveries
            if not delivery.task_id or delivery.task_id not in known])
        _count_parked(partition, Reason.OVERFLOW, parked)
        held_now = state.status == KeyStatus.ACTIVE
        changed = ["sequence", "updated_at"]
        if held_now:
            state.epoch += 1
            state.status = KeyStatus.RETRYING
            state.retry_at = timezone.now()
            changed += ["epoch", "status", "retry_at"]
        state.write(changed)
    return state, held_now


def _note_failure(state: AccountState, error: str, now: datetime) -> None:
    state.failures += 1
    state.last_error = error
    state.last_error_at = now


def block(key: str, partition: int, *, delivery: Delivery | None = None, row: ParkedMessage | None = None,
          reason: str = Reason.FAILED, error: str = "", trace: str = "", attempts: int = 1) -> AccountState:
    """Block the key with this message (new or already parked) at the head of its queue."""
    now = timezone.now()
    with transaction.atomic():
        state = locked_state(key, partition)
        _put(state, row, delivery, reason=reason, state=PARKED, exception=error, traceback=trace,
             attempts=attempts, due_at=None)
        _note_failure(state, error, now)
        state.block(now)
        state.save()
    return state


def schedule_retry(key: str, partition: int, *, due_at: datetime, delivery: Delivery | None = None,
                   row: ParkedMessage | None = None, error: str, trace: str, attempts: int,
                   retries: int, body: bytes | None = None) -> AccountState:
    """Hold the key until ``due_at``, when this message (the head) runs again."""
    with transaction.atomic():
        state = locked_state(key, partition)
        fields: dict[str, Any] = {"reason": Reason.RETRYING, "state": PARKED, "exception": error,
                                  "traceback": trace, "attempts": attempts, "due_at": due_at}
        source = row if row is not None else delivery
        if source is not None:
            fields["headers"] = {**source.headers, "retries": retries}
        if body is not None:
            fields["body"] = body
        _put(state, row, delivery, **fields)
        _note_failure(state, error, timezone.now())
        if state.status == KeyStatus.ACTIVE:
            state.epoch += 1
        state.status = KeyStatus.RETRYING
        state.retries += 1
        state.retry_at = due_at
        state.save()
    return state


def record_failure(key: str, partition: int, *, delivery: Delivery | None = None,
                   row: ParkedMessage | None = None, error: str, trace: str, attempts: int) -> None:
    """Keep a failed message as a record and let its key go on (policy ``continue``)."""
    with transaction.atomic():
        state = locked_state(key, partition)
        _put(state, row, delivery, reason=Reason.FAILED, state=ParkedMessage.State.FAILED,
             exception=error, traceback=trace, attempts=attempts, due_at=None)
        _note_failure(state, error, timezone.now())
        state.save()


def record_revoked(delivery: Delivery, error: str) -> AccountState:
    """Keep a revoked message as a record; its key goes on."""
    with transaction.atomic():
        state = locked_state(delivery.key, delivery.partition)
        _add_row(state, delivery, reason=Reason.REVOKED, state=ParkedMessage.State.SKIPPED, exception=error)
        state.save(update_fields=["sequence", "updated_at"])
    return state


def activate(key: str, partition: int) -> bool:
    """The key runs its messages directly again, unless messages were parked meanwhile (False then).

    A crowded key's messages may be parked (spilled) while its parked
    messages run; the check and the change share the key's row lock with
    every park, so none is left behind an active key.
    """
    with transaction.atomic():
        state = locked_state(key, partition)
        if ParkedMessage.objects.filter(key=key, state=PARKED).exists():
            return False
        state.status = KeyStatus.ACTIVE
        state.retry_at = None
        state.save()
    return True


def park_unrunnable(delivery: Delivery, reason: str, error: str) -> AccountState:
    """Park a message that cannot be run as it is: it blocks its key (or waits behind it)."""
    with transaction.atomic():
        state = locked_state(delivery.key, delivery.partition)
        if state.status != KeyStatus.ACTIVE:
            _add_row(state, delivery, reason=reason, exception=error)
            state.save(update_fields=["sequence", "updated_at"])
            return state
    return block(delivery.key, delivery.partition, delivery=delivery, reason=reason, error=error,
                 attempts=0)


def refuse(delivery: Delivery, reason: str, error: str) -> AccountState:
    """Keep a message that belongs to no key of its partition as a record; nothing is held.

    ``delivery.key`` is :data:`~ordered_tasks.worker.delivery.NO_KEY`; the
    message's headers and body say what it was.
    """
    with transaction.atomic():
        state = locked_state(delivery.key, delivery.partition)
        _add_row(state, delivery, reason=reason, state=ParkedMessage.State.REFUSED, exception=error)
        state.save(update_fields=["sequence", "updated_at"])
    return state


def set_aside_revoked(row: ParkedMessage) -> None:
    """A parked message whose task was revoked meanwhile: kept as a skipped record, not run."""
    with fenced(row.partition):
        row.state = ParkedMessage.State.SKIPPED
        row.exception = f"Revoked while parked ({row.reason}); not run."
        row.save(update_fields=["state", "exception", "updated_at"])
