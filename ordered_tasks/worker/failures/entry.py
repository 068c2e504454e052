"""Where a worker enters an ordered task: the guard around each delivered message, retries in place."""

from __future__ import annotations

import logging
from typing import Any, Callable

from celery.exceptions import Reject

from ...options import KEY_HEADER
from ..delivery import FENCE_ENTRY, TENURE_ENTRY, delivered_partition, queue_partition
from ..exclusivity.fencing import DEADLINES, FENCE, TENURE
from ..health import metrics
from .book import BOOK
from .control import apply_control
from .guard import requeue_unless_stored, run_guarded
from .retry import retry_in_place

logger = logging.getLogger(__name__)


def delivered_in_order(request: Any) -> bool:
    """Whether the task runs from a message of a partition queue.

    A message without the ``ordered_key`` header (from a producer that is
    not ordered_tasks) is guarded too: the guard finds its key.
    """
    if getattr(request, KEY_HEADER, None) is not None:
        return True
    return queue_partition(getattr(request, "delivery_info", None)) is not None


def refuse_without_lease(request: Any, partition: int) -> None:
    """Hand the message back unless this worker still holds its partition's lease (Redis).

    A worker frozen past its lease must not start a message it fetched
    before: the partition's new owner got it back at the head of the queue
    and may have run later messages of its key already. It goes back to the
    head (a no-op once the new owner restored it).
    """
    if not DEADLINES.allows(partition):
        metrics.count(partition, metrics.LEASE_REFUSED)
        logger.warning("Not starting %s: this worker's lease of partition %d may have lapsed; the "
                       "message goes back to the head of its queue.", request.id, partition)
        raise Reject("the partition's lease lapsed", requeue=True)


def refuse_from_a_lost_connection(request: Any, partition: int) -> None:
    """Hand the message back if the broker connection it arrived on was lost since (RabbitMQ).

    RabbitMQ put it back in its place when the connection closed, and may
    have made a standby the queue's active consumer, which may run it, and
    later messages of its key, now. It stays in the pool's queue until it
    begins, and a replay runs its parked messages one after the other: each
    checks here. Handing it back is a no-op on the closed channel.
    """
    tenure = getattr(request, TENURE_ENTRY, None)
    versions = BOOK.versions
    if tenure is None or versions is None:
        return
    if versions.tenure(partition) != tenure:
        logger.warning("Not starting %s: the broker connection it arrived on was lost, and the queue of "
                       "partition %d gave it back to whichever consumer is active now.", request.id,
                       partition)
        raise Reject("the connection it arrived on was lost", requeue=True)


class WorkerSide:
    """The worker's half of :class:`~ordered_tasks.task.GuardedTaskMixin` (named by ``WORKER_SIDE``)."""

    def call(self, task: Any, request: Any, args: Any, kwargs: Any, plain: Callable[..., Any]) -> Any:
        """Run one delivered message: under its partition's lease and fence, through the guard."""
        if not delivered_in_order(request):
            return plain(*args, **kwargs)
        partition = delivered_partition(vars(request))
        refuse_without_lease(request, partition)
        refuse_from_a_lost_connection(request, partition)
        token = FENCE.set(getattr(request, FENCE_ENTRY, None))
        tenure = TENURE.set(getattr(request, TENURE_ENTRY, None))
        try:
            if task.ordered_control:
                return plain(*args, **kwargs)
            return run_guarded(task, request, args, kwargs)
        finally:
            TENURE.reset(tenure)
            FENCE.reset(token)

    def retry(self, task: Any, request: Any, plain: Callable[[], Any], **how: Any) -> Any:
        """``task.retry(...)``: in place for a delivered message, Celery's own otherwise."""
        if not delivered_in_order(request):
            return plain()
        return retry_in_place(task, request, **how)

    def control(self, task: Any, key: str, action: str, request_id: int | None, due: str | None) -> str:
        """The body of the control task: apply a replay, skip or wake-up to ``key``."""
        with requeue_unless_stored(f"control message {action} for key {key!r}"):
            return apply_control(task.app, key, action, request_id, due)
