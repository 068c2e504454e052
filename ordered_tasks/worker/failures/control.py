"""What the consumer does with a control message: wake-ups, replays and skips."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from celery import Celery, states
from celery.app.trace import trace_task
from celery.utils.nodenames import gethostname
from django.db import transaction
from django.utils import timezone
from kombu.serialization import loads, prepare_accept_content

from ...messages import publish_control, publish_wake
from ...models import AccountState, ControlRequest, ParkedMessage
from ...queues import queue_of_key
from ...signals import key_resumed
from ...states import ControlAction, KeyStatus
from ..delivery import CONTENT_ENTRY, FENCE_ENTRY, TENURE_ENTRY
from ..exclusivity.fencing import FENCE, TENURE
from ..health import metrics
from ..pooled import SIDE
from ..redelivery.ledger import ledger_for
from ..redelivery.revokes import is_revoked
from . import store
from .book import BOOK
from .guard import REPLAYING, Outcome, Replaying, announce_blocked

logger = logging.getLogger(__name__)

#: Parked messages run per control message; a longer backlog continues
#: behind the messages waiting in the partition queue.
DRAIN_BATCH = 100
#: A wake-up more than this much earlier than the key's retry time is stale.
STALE_AFTER = timedelta(milliseconds=1)


def apply_control(app: Celery, key: str, action: str | ControlAction, request_id: int | None,
                  due: str | None = None) -> str:
    """Apply one control message; return what happened (for the worker log)."""
    partition = queue_of_key(key).partition
    try:
        action = ControlAction(action)
    except ValueError:
        logger.error("Unknown control action %r for key %r: ignored.", action, key)
        return "unknown action"
    if action == ControlAction.WAKE:
        return wake(app, key, partition, datetime.fromisoformat(due) if due else None)
    request = ControlRequest.objects.filter(pk=request_id or 0).first()
    if request is None:
        logger.error("Control request %s for key %r does not exist: ignored.", request_id, key)
        return "unknown request"
    with store.fenced(partition):
        state = AccountState.objects.select_for_update().filter(key=key).first()
        refusal = _refusal(state, request)
        outcome = refusal or "applied"
        if refusal is None and state is not None:
            head = ParkedMessage.objects.filter(key=key, state=store.PARKED).order_by("position").first()
            if action == ControlAction.SKIP and head is not None:
                head.state = ParkedMessage.State.SKIPPED
                head.save(update_fields=["state", "updated_at"])
                state.skips += 1
            elif head is not None:
                head.headers = {**head.headers, "retries": 0}
                head.save(update_fields=["headers", "updated_at"])
            if action == ControlAction.REPLAY:
                state.replays += 1
            state.epoch += 1
            state.status = KeyStatus.RETRYING
            state.retry_at = timezone.now()
            state.save()
        request.applied_at = timezone.now()
        request.outcome = outcome
        request.save(update_fields=["applied_at", "outcome"])
    if outcome != "applied":
        logger.info("%s of key %r: %s", action, key, outcome)
        return outcome
    metrics.count(partition, metrics.SKIPS if action == ControlAction.SKIP else metrics.REPLAYS)
    BOOK.set(key, partition, KeyStatus.RETRYING)
    status = drain(app, key, partition)
    ControlRequest.objects.filter(pk=request.pk).update(outcome=f"applied; key is {status}")
    return status


def _refusal(state: AccountState | None, request: ControlRequest) -> str | None:
    if state is None:
        return "nothing to do: the key has no state"
    if state.status == KeyStatus.ACTIVE:
        return "nothing to do: the key is active"
    if state.epoch != request.epoch:
        return "nothing to do: the request is for an earlier incident of the key (already applied)"
    return None


def wake(app: Celery, key: str, partition: int, due: datetime | None = None) -> str:
    """An in-place retry may be due: run the key's parked messages if it is.

    ``due`` is the retry time the wake-up was published for. A wake-up for an
    earlier retry than the key's current one is stale (the current retry
    published its own) and does nothing; one that fired early is put back.
    """
    state = AccountState.objects.filter(key=key).first()
    if state is None or state.status != KeyStatus.RETRYING:
        return "nothing to do: the key is not retrying"
    retry_at = state.retry_at
    if retry_at is not None and due is not None and retry_at > due + STALE_AFTER:
        return "nothing to do: a later retry is scheduled"
    if retry_at is not None and retry_at > timezone.now():
        publish_wake(app, key, retry_at)
        return "not due yet"
    return drain(app, key, partition)


def drain(app: Celery, key: str, partition: int, batch: int = DRAIN_BATCH) -> str:
    """Run the key's parked messages in order; return the key's status afterwards."""
    rows = list(ParkedMessage.objects.filter(key=key, state=store.PARKED).order_by("position")[:batch + 1])
    ledger = ledger_for(app)
    for row in rows[:batch]:
        outcome = run_parked(app, row)
        if outcome == Outcome.OK:
            if ledger is not None and row.task_id:  # a copy still in the broker is recognised
                ledger.record(partition, row.task_id)
                ledger.send_noted()  # before its row goes: no acknowledgement follows here
            store.delete_parked(row)
        elif outcome == Outcome.HANDED_BACK:
            # The key stays retrying; its partition's owner (this worker or a new one)
            # drains it when the wake-up arrives.
            logger.warning("Replay of key %r handed back at message %s; waking the key again.",
                           key, row.task_id)
            publish_control(app, key, ControlAction.WAKE, due=timezone.now())
            return KeyStatus.RETRYING.value
        elif outcome != Outcome.CONTINUED:
            return str(outcome.value)
    if len(rows) <= batch and store.activate(key, partition):
        BOOK.set(key, partition, KeyStatus.ACTIVE)
        key_resumed.send(sender=AccountState, key=key, partition=partition)
        return KeyStatus.ACTIVE.value
    # More parked messages (a longer backlog, or spilled meanwhile): go on behind the queue.
    with transaction.atomic():
        state = store.locked_state(key, partition)
        state.status = KeyStatus.RETRYING
        state.retry_at = timezone.now()
        state.save(update_fields=["status", "retry_at", "updated_at"])
    BOOK.set(key, partition, KeyStatus.RETRYING)
    publish_control(app, key, ControlAction.WAKE, due=state.retry_at)
    return KeyStatus.RETRYING.value


def run_parked(app: Celery, row: ParkedMessage) -> Outcome:
    """Run one parked message through Celery's tracer, and say how it went."""
    if row.task_id and is_revoked(row.task_id):
        store.set_aside_revoked(row)
        return Outcome.CONTINUED
    task = app.tasks.get(row.task_name)
    if task is None:
        return _block(row, store.Reason.UNKNOWN_TASK,
                      f"No task named {row.task_name!r} is registered in this worker.")
    try:
        args, kwargs, embed = loads(bytes(row.body), row.content_type, row.content_encoding,
                                    accept=prepare_accept_content(app.conf.accept_content))
    except Exception as exc:
        return _block(row, store.Reason.UNDECODABLE, store.describe(exc)[0])
    request: dict[str, Any] = {
        **row.headers, **(embed or {}), "id": row.task_id or row.headers.get("id"),
        "args": args, "kwargs": kwargs, "is_eager": False,
        "hostname": gethostname(),
        "delivery_info": {"exchange": "", "routing_key": queue_of_key(row.key).queue.name,
                          "priority": None, "redelivered": False},
        CONTENT_ENTRY: [row.content_type, row.content_encoding],
        FENCE_ENTRY: FENCE.get(),
        TENURE_ENTRY: TENURE.get(),
    }
    replaying = Replaying(row=row)
    token = REPLAYING.set(replaying)
    try:
        _, info, _, _ = trace_task(task, row.task_id, args, kwargs, request, app=app)
    finally:
        REPLAYING.reset(token)
    if replaying.outcome != Outcome.NOT_RUN:
        return replaying.outcome
    if info is None:  # a task without the ordered guard that succeeded
        return Outcome.OK
    if info.state == states.REJECTED:  # not started: this worker's lease may have lapsed
        return Outcome.HANDED_BACK
    return _block(row, store.Reason.INVALID, f"Celery did not run the task: {info.state} {info.retval!r}")


def _block(row: ParkedMessage, reason: str, error: str) -> Outcome:
    store.block(row.key, row.partition, row=row, reason=reason, error=error, attempts=row.attempts)
    announce_blocked(row.key, row.partition, row.task_name, row.task_id, error, reason)
    return Outcome.BLOCKED


def arrived(app: Celery | None, partition: int) -> None:
    """Main process: a message of ``partition`` arrived (see :meth:`.book.KeyBook.arrived`).

    The first one of a tenure also publishes the partition's retrying keys'
    wake-ups again, on the side thread: the previous owner may have been
    killed after it held a key and before it published the key's wake-up
    (a spill, an in-place retry); without this the key would wait for a
    worker of the partition to start.
    """
    if BOOK.arrived(partition):
        metrics.partition_owned(partition, True)  # on RabbitMQ, the first sign that it is ours
        if app is not None:
            wake_retrying(app, partition)


def wake_retrying(app: Celery, partition: int) -> None:
    """Publish the wake-ups of ``partition``'s retrying keys on the side thread (see :func:`arrived`)."""

    def failed(error: Any) -> None:
        logger.warning("Could not wake the retrying keys of partition %s: %s", partition, error)

    SIDE.submit(recover_retries, (app, [partition]), done=lambda _count: None, failed=failed)


def recover_retries(app: Celery, partitions: list[int] | tuple[int, ...] | Any) -> int:
    """Publish a wake-up for every retrying key of ``partitions`` (after a restart)."""
    now = timezone.now()
    held = AccountState.objects.filter(partition__in=list(partitions), status=KeyStatus.RETRYING)
    count = 0
    for key, retry_at in held.values_list("key", "retry_at"):
        publish_control(app, key, ControlAction.WAKE, eta=retry_at if retry_at and retry_at > now else None,
                        due=retry_at)
        count += 1
    if count:
        logger.info("Scheduled %d retrying keys again.", count)
    return count
