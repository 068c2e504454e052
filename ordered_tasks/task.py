"""The base classes of ordered tasks: key and queue at publish time, the worker's half named by path."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any, Callable

from celery import Task
from kombu.utils.imports import symbol_by_name

from .keys import KeySpec
from .options import KEY_HEADER, PARTITION_HEADER, check_publish_options
from .queues import queue_of_key

#: Seconds before an in-place retry that names no delay (Celery's default is 180).
DEFAULT_RETRY_DELAY = 2
#: The worker's half of ordered tasks (the guard, in-place retries, control messages). It is
#: named, not imported, as Celery names ``Task.Request``: a process that only publishes never
#: loads it, and a worker loads it with the first message it runs.
WORKER_SIDE = "ordered_tasks.worker.failures.entry:WorkerSide"


@functools.cache
def worker_side(path: str) -> Any:
    """The worker's half of ordered tasks at ``path`` (loaded once per process)."""
    return symbol_by_name(path)()


class GuardedTaskMixin:
    """What a worker does with a task of a partition queue: the guard, and retries in place.

    Ordered tasks have it through :class:`OrderedTaskMixin`; an ordered
    worker gives it to the plain tasks that ``ORDERED_TASKS["ROUTES"]``
    orders. Called directly or eagerly, a task behaves as Celery's own.
    """

    #: The worker request class: keeps the content type so that a parked body can be stored.
    Request = "ordered_tasks.worker.failures.request:OrderedRequest"
    #: What a failure does once retries are exhausted: ``"block"`` or ``"continue"``.
    failure_policy = "block"
    #: Options that a plain task ordered by ``ROUTES`` keeps from its own class
    #: (see :func:`~ordered_tasks.compat.guard_task`).
    task_options = ("failure_policy", "default_retry_delay")
    #: Seconds before an in-place retry that names no delay (Celery's default is 180).
    default_retry_delay = DEFAULT_RETRY_DELAY
    #: True for the control task, which runs even while its key is held.
    ordered_control = False
    #: Dotted path of the worker's half (see :data:`WORKER_SIDE`).
    worker_side = WORKER_SIDE
    name: str
    request: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        plain: Callable[..., Any] = super().__call__  # type: ignore[misc]
        return worker_side(self.worker_side).call(self, request, args, kwargs, plain)

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None,
              throw: bool = True, eta: datetime | None = None, countdown: float | None = None,
              max_retries: int | None = None, **options: Any) -> Any:
        """Run this message again after ``countdown`` seconds, before any later message of its key.

        Takes the arguments of :meth:`celery.app.task.Task.retry` but never
        republishes: the message stays at the head of its key's queue.
        """
        plain = functools.partial(super().retry,  # type: ignore[misc]
                                  args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        request = self.request
        if request.called_directly or request.is_eager:
            return plain()
        return worker_side(self.worker_side).retry(
            self, request, plain, args=args, kwargs=kwargs, exc=exc, throw=throw, eta=eta,
            countdown=countdown, max_retries=max_retries, options=options)


class OrderedTaskMixin(GuardedTaskMixin):
    """Mixed in front of the app's Task class by :func:`ordered_task`."""

    #: Where the ordering key lives in the task's arguments (set by the decorator).
    ordered_key: KeySpec
    #: The message is acknowledged after the task ran, so a crash cannot lose it.
    acks_late = True

    def publish_options(self, args: Any, kwargs: Any, options: dict[str, Any]) -> dict[str, Any]:
        """Validate one publish and return its options with queue and headers set."""
        check_publish_options(self.name, options)
        key = self.ordered_key.canonical(args, kwargs)
        partition, queue = queue_of_key(key)
        headers = dict(options.get("headers") or {})
        headers[KEY_HEADER] = key
        headers[PARTITION_HEADER] = partition
        return {**options, "queue": queue, "headers": headers}

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: Any = None,
                    producer: Any = None, link: Any = None, link_error: Any = None,
                    shadow: Any = None, **options: Any) -> Any:
        """Publish to the key's partition queue (see :meth:`celery.app.task.Task.apply_async`)."""
        options = self.publish_options(args, kwargs, options)
        return super().apply_async(  # type: ignore[misc]
            args, kwargs, task_id, producer, link, link_error, shadow, **options)

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """Like ``delay`` after the transaction commits; bad keys raise now."""
        self.publish_options(args, kwargs, {})
        super().delay_on_commit(*args, **kwargs)  # type: ignore[misc]

    def apply_async_on_commit(self, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        """Like ``apply_async`` after the transaction commits; bad input raises now."""
        self.publish_options(args, kwargs, options)
        super().apply_async_on_commit(args, kwargs, **options)  # type: ignore[misc]


class OrderedTask(OrderedTaskMixin, Task):  # type: ignore[misc,type-arg]
    """An ordered task on Celery's plain Task class.

    Tasks made by :func:`~ordered_tasks.ordered_task` derive from the app's
    own Task class instead (``DjangoTask`` in a Django project); test for
    them with ``isinstance(task, OrderedTaskMixin)``.
    """
