"""The Task-class side of ordered tasks in the worker: in-place retry and the guard hook."""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from typing import Any

from celery.exceptions import Ignore, Reject, Retry
from django.utils import timezone

from ...exceptions import UnsafeOptionError
from ...options import KEY_HEADER
from ..delivery import FENCE_ENTRY, delivered_partition, queue_partition
from ..exclusivity.fencing import DEADLINES, FENCE

logger = logging.getLogger(__name__)

DEFAULT_RETRY_DELAY = 2


class InPlaceRetry(Retry):
    """Raised by ``retry()`` of an ordered task: run this message again in its place."""

    def __init__(self, exc: BaseException | None, countdown: float,
                 args: Any = None, kwargs: Any = None) -> None:
        super().__init__(exc=exc, when=countdown)  # type: ignore[arg-type]
        self.countdown = countdown
        self.new_args = args
        self.new_kwargs = kwargs


class Parked(Ignore):
    """The message was parked behind a held key instead of running."""


def seconds_until(when: Any) -> float | None:
    """``when`` of a Celery ``Retry`` (seconds or a datetime) as seconds from now."""
    if when is None:
        return None
    if isinstance(when, datetime):
        return max(0.0, (when - timezone.now()).total_seconds())
    return max(0.0, float(when))


def _delivered_in_order(request: Any) -> bool:
    """Whether the task runs from a message of a partition queue (not called directly or eagerly).

    A message without the ``ordered_key`` header (from a producer that is
    not ordered_tasks) is guarded too: the guard finds its key.
    """
    if request.called_directly or request.is_eager:
        return False
    if getattr(request, KEY_HEADER, None) is not None:
        return True
    return queue_partition(getattr(request, "delivery_info", None)) is not None


def _refuse_without_lease(request: Any) -> None:
    """Hand the message back unless this worker still holds its partition's lease (Redis).

    A worker frozen past its lease must not start a message it fetched
    before: the partition's new owner got it back at the head of the queue
    and may have run later messages of its key already. It goes back to the
    head (a no-op once the new owner restored it).
    """
    partition = delivered_partition(vars(request))
    if not DEADLINES.allows(partition):
        logger.warning("Not starting %s: this worker's lease of partition %d may have lapsed; the "
                       "message goes back to the head of its queue.", request.id, partition)
        raise Reject("the partition's lease lapsed", requeue=True)


class GuardedTaskMixin:
    """Worker behaviour of ordered tasks; mixed into their Task class."""

    #: The worker request class: keeps the content type so that a parked body can be stored.
    Request = "ordered_tasks.worker.failures.request:OrderedRequest"
    #: What a failure does once retries are exhausted: ``"block"`` or ``"continue"``.
    failure_policy = "block"
    #: Seconds before an in-place retry that names no delay (Celery's default is 180).
    default_retry_delay = DEFAULT_RETRY_DELAY
    #: True for the control task, which runs even while its key is held.
    ordered_control = False
    name: str
    request: Any
    max_retries: int | None
    MaxRetriesExceededError: type[Exception]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if not _delivered_in_order(request):
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        _refuse_without_lease(request)
        token = FENCE.set(getattr(request, FENCE_ENTRY, None))
        try:
            if self.ordered_control:
                return super().__call__(*args, **kwargs)  # type: ignore[misc]
            from .guard import run_guarded

            return run_guarded(self, request, args, kwargs)
        finally:
            FENCE.reset(token)

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None,
              throw: bool = True, eta: datetime | None = None, countdown: float | None = None,
              max_retries: int | None = None, **options: Any) -> Any:
        """Run this message again after ``countdown`` seconds, before any later message of its key.

        Takes the arguments of :meth:`celery.app.task.Task.retry` but never
        republishes: the message stays at the head of its key's queue.
        """
        request = self.request
        if not _delivered_in_order(request):
            return super().retry(  # type: ignore[misc]
                args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        if options or not throw:
            refused = ", ".join(sorted(options)) or "throw=False"
            raise UnsafeOptionError(
                f"{self.name}.retry() cannot take {refused}: an ordered task retries in "
                "place, in its own queue. Pass only exc, countdown, eta, max_retries, args or kwargs."
            )
        exc = exc or sys.exc_info()[1]
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and (request.retries or 0) >= limit:
            if exc is not None:
                raise exc
            raise self.MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}")
        delay = seconds_until(eta) if countdown is None else countdown
        if delay is None:
            delay = self.default_retry_delay
        raise InPlaceRetry(exc, float(delay), args, kwargs)




_GUARDED: dict[type, type] = {}


def guard_task(task: Any) -> None:
    """Give a task routed by ``ORDERED_TASKS["ROUTES"]`` the worker behaviour of ordered tasks.

    Such tasks are plain Celery tasks of the worker's project; their class is
    swapped for a subclass with :class:`GuardedTaskMixin` in front.
    """
    cls = type(task)
    if issubclass(cls, GuardedTaskMixin):
        return
    guarded = _GUARDED.get(cls)
    if guarded is None:
        guarded = type(f"Guarded{cls.__name__}", (GuardedTaskMixin, cls), {"__module__": cls.__module__})
        _GUARDED[cls] = guarded
    task.__class__ = guarded
