"""A crowded key's waiting messages, parked in one batch in delivery order, so that they leave the window."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import current_app
from django.utils import timezone

from ...messages import publish_wake
from ..delivery import Delivery
from ..exclusivity.fencing import DEADLINES, FENCE
from ..health import metrics
from ..pooled import SIDE
from ..sequencing.claims import Begin
from ..sequencing.handoff import LOOP
from ..sequencing.lanes import Entry, Lanes, resolve_claims
from ..sequencing.window import worker_running
from ..transport.frames import written_together
from . import store
from .book import BOOK

logger = logging.getLogger(__name__)
#: Tries to publish a spilled key's wake-up.
WAKE_ATTEMPTS = 3


def spilled_delivery(message: Any, partition: int, key: str) -> Delivery:
    """The message as it is parked: its body as its task reads it.

    kombu's ``Message`` has already decompressed the body of a compressed
    message (Celery's ``task_compression``), so the header goes. Its
    headers stay as delivered: the spill writes them as JSON text once.
    """
    delivery = Delivery.from_message(message, partition, plain_headers=False)
    delivery.key = key
    delivery.headers.pop("compression", None)
    return delivery


class LeaseLapsed(Exception):
    """The worker may no longer start messages of the partition: its lease lapsed, or the partition moved."""


def spill_over(worker: Any, lanes: Lanes, partition: int, key: str, batch: list[Entry]) -> None:
    """Have the spill thread park ``batch`` (waiting messages of ``key``, in delivery order).

    Once they are stored their messages are acknowledged, which settles
    them in ``lanes``; if storing fails (the database, a lost lease) they go
    back to the head of their lane, marked as redelivered, and run through
    the guard one at a time, as any message of a held key does: a message
    that was parked after all is recognised and not parked twice. Called
    on the consumer's event loop.
    """
    keeper = getattr(worker, "keeper", None)
    fence = keeper.fence_of(partition) if keeper is not None else None
    versions = BOOK.versions
    tenure = versions.tenure(partition) if versions is not None else None

    def failed(error: Any) -> None:
        resolve_claims(batch, Begin.CHECK)  # the withdrawn head runs after all, as a redelivered copy
        logger.warning("Could not park %d waiting messages of key %r of partition %s (%s); they run "
                       "through the window one at a time instead.", len(batch), key, partition, error)
        for entry in batch:
            info = getattr(entry.message, "delivery_info", None)
            if isinstance(info, dict):
                info["redelivered"] = True  # the guard asks whether it was parked after all
        LOOP.call(lambda: lanes.spill_failed(partition, key, batch))

    if keeper is not None and fence is None:
        failed("the worker does not hold the partition's lease")
        return

    def acknowledge() -> None:
        logger.debug("Parked %d waiting messages of key %r of partition %s.", len(batch), key, partition)
        try:
            # RabbitMQ: the batch's acknowledgements in one write, not one each (see transport.frames).
            with written_together(connection):
                for entry in batch:
                    _acknowledge(lanes, entry)
        except Exception as exc:  # the connection closed: the copies that come back are recognised
            logger.warning("Could not acknowledge %d spilled messages (%r); their copies that come back "
                           "are recognised as parked.", len(batch), exc)

    def done(_status: str) -> None:
        resolve_claims(batch, Begin.PARKED)  # the withdrawn head's task ends without running
        if worker_running():
            LOOP.call(acknowledge)
        else:  # the loop has stopped: the copies that come back are recognised as parked
            logger.info("Parked %d waiting messages of key %r of partition %s as the worker stopped; "
                        "they come back and are recognised.", len(batch), key, partition)

    connection = getattr(getattr(batch[0].message, "channel", None), "connection", None)
    messages = [entry.message for entry in batch]
    logger.debug("Key %r of partition %s has %d messages waiting: parking them.", key, partition, len(batch))
    app = getattr(worker, "app", None)
    # Not in the pool, whose queue may hold whole windows of tasks ahead of the spill (and the
    # partition's other keys wait for it), but on the side thread, one batch after the other.
    SIDE.submit(park_messages, (key, partition, messages, fence, tenure, app), done=done, failed=failed)


def _acknowledge(lanes: Lanes, entry: Entry) -> None:
    """Acknowledge a parked message, unless its partition went back to its queue meanwhile.

    Not a withdrawn one that had been started: its task acknowledges it as it ends.
    """
    if lanes.entry(entry.tag) is not entry or entry.started:
        return  # its copy that comes back is recognised as parked
    try:
        entry.message.ack()
    except Exception as exc:  # the connection closed: the copy that comes back is recognised
        logger.warning("Could not acknowledge spilled message %s (%r); its copy that comes back is "
                       "recognised as parked.", entry.tag, exc)
        lanes.settled(entry.tag)


def park_messages(key: str, partition: int, messages: list[Any], fence: int | None = None,
                  tenure: int | None = None, app: Any = None) -> str:
    """Spill thread: :func:`spill_in_worker` with ``messages`` as they are parked.

    They are read here rather than on the event loop, which meanwhile
    receives and starts the partition's other messages.
    """
    deliveries = [spilled_delivery(message, partition, key) for message in messages]
    return spill_in_worker(key, partition, deliveries, fence, tenure, app)


def spill_in_worker(key: str, partition: int, deliveries: list[Delivery], fence: int | None = None,
                    tenure: int | None = None, app: Any = None) -> str:
    """Spill thread's side of :func:`spill_over`: park the messages; hold the key until they ran.

    A key that was active is now retrying, due now: its wake-up, published
    to its partition queue, runs the parked messages in order behind what
    its lane still holds. ``fence`` is the worker's fencing token of the
    partition (Redis): a stale owner's write is refused. Nothing is written
    once the worker's lease of the partition may have lapsed, or once the
    partition's messages started arriving again (``tenure`` changed: they
    went back to the queue, and a copy may run meanwhile). ``app`` publishes
    the wake-up (Celery's current app of the thread by default).
    """

    def still_ours() -> None:
        if not DEADLINES.allows(partition):
            metrics.count(partition, metrics.LEASE_REFUSED)
            raise LeaseLapsed(f"the lease of partition {partition} may have lapsed")
        versions = BOOK.versions
        if tenure is not None and versions is not None and versions.tenure(partition) != tenure:
            raise LeaseLapsed(f"partition {partition} started a new tenure")

    token = FENCE.set(fence)
    try:
        state, held_now = store.spill(key, partition, deliveries, before_write=still_ours)
    finally:
        FENCE.reset(token)
    BOOK.set(key, partition, state.status)
    if held_now:
        _wake(app or current_app, key, state.retry_at or timezone.now())
    return str(state.status)


def _wake(app: Any, key: str, due: Any) -> None:
    """Publish the key's wake-up; the messages are parked already, so a failure must not undo the spill.

    Without its wake-up the key waits for its partition's next tenure (a
    restart, a takeover, a reconnect: it wakes the partition's retrying
    keys), or for an operator's replay: said at CRITICAL.
    """
    for attempt in range(WAKE_ATTEMPTS):
        try:
            publish_wake(app, key, due)
            return
        except Exception as exc:  # the broker went away
            error = exc
            time.sleep(0.5 * (attempt + 1))
    logger.critical("Key %r holds parked messages but its wake-up could not be published (%r): it runs "
                    "them when its partition is next taken over or reconnected, or replay it from the "
                    "admin.", key, error)
