"""Messages a worker cannot run (unknown task, undecodable body): parked, never dropped."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from ...models import ParkedMessage
from ..delivery import Delivery, key_of_partition, queue_partition
from ..exclusivity.fencing import FENCE
from ..pooled import run_in_pool
from ..sequencing.lanes import BARRIER
from ..sequencing.window import hand_back_in_place, lane_key
from . import store
from .control import arrived
from .guard import park_misfit

logger = logging.getLogger(__name__)
Reason = ParkedMessage.Reason


def partition_of_message(message: Any) -> int | None:
    """The partition whose queue delivered ``message``, or None for any other queue."""
    return queue_partition(getattr(message, "delivery_info", None))


def hand_over(worker: Any, message: Any, reason: str, error: str,
              ack: Callable[[], Any] | None = None, requeue: Callable[[], Any] | None = None) -> bool:
    """Have a pool process of ``worker`` park ``message``; acknowledge it once parked.

    ``worker`` is the consumer, or what ``ordered_worker`` set up: it has the
    ``pool`` and, on Redis, the lease ``keeper`` whose fencing token goes
    with the write.

    Returns False (the caller carries on as Celery would) when the message did
    not come from a partition queue. Parking happens in the process that runs
    the partition's tasks, so that its memory of held keys stays right.
    ``ack`` defaults to the message's own ``ack``; ``requeue`` to running
    the message again in its place (or, out of the lanes, to
    ``reject(requeue=True)``). Both run on the consumer's event loop, as
    Celery's own acknowledgements do: the threads pool calls back from its
    threads.
    """
    partition = partition_of_message(message)
    if partition is None:
        return False
    app = getattr(getattr(worker, "consumer", worker), "app", None)
    arrived(app, partition)
    delivery = Delivery.from_message(message, partition)
    if not delivery.key and app is not None:
        # No key header (another producer): the key of its arguments, where they tell one, so
        # that the record (a revoked message's, say) is found under its account.
        key = lane_key(app, message)
        if key is not BARRIER:
            delivery.key = key
    logger.error("Parking message %s of key %r (%s): %s", delivery.task_id or "?", delivery.key,
                 reason, error)

    consumer = getattr(worker, "consumer", worker)
    call_soon = getattr(consumer, "call_soon", None) or (lambda fn: fn())

    def hand_back() -> None:
        if not hand_back_in_place(consumer, message):
            message.reject(requeue=True)

    def parked(_result: Any) -> None:
        call_soon(ack or message.ack)

    def failed(error: Any) -> None:
        logger.critical("Could not park message %s; handing it back: %s", delivery.task_id or "?", error)
        call_soon(requeue or hand_back)

    keeper = worker.keeper
    fence = keeper.fence_of(partition) if keeper is not None else None
    run_in_pool(worker.pool, park_in_worker, (dataclasses.asdict(delivery), reason, error, fence),
                done=parked, failed=failed)
    return True


def park_in_worker(fields: dict[str, Any], reason: str, error: str, fence: int | None = None) -> str:
    """Pool side of :func:`hand_over`: store the message and hold its key.

    ``fence`` is the worker's fencing token of the partition (Redis): a
    stale owner's write is refused, and the message is handed back.
    """
    delivery = Delivery(**fields)
    delivery.key = key_of_partition(delivery.key, delivery.partition)
    token = FENCE.set(fence)
    try:
        if reason == Reason.REVOKED:
            return store.record_revoked(delivery, error).status
        park_misfit(delivery, reason, error)
        return reason
    finally:
        FENCE.reset(token)
