"""What ``ordered_worker`` set up in this process: the partitions of each ordered app, and its consumer."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from celery import Celery


@dataclass(eq=False)
class OrderedWorker:
    """A Celery app that ``ordered_worker`` made an ordered worker, and its consumer once it runs."""

    #: The partitions this worker process serves.
    partitions: list[int]
    #: The pool size ``ordered_worker`` chose.
    concurrency: int = 1
    #: The worker's consumer (:class:`~ordered_tasks.worker.consumer.OrderedConsumer`), which
    #: holds the worker's state: its pool and, on Redis, its lease keeper.
    consumer: Any = None

    @property
    def pool(self) -> Any:
        """The consumer's pool, or None before the consumer exists."""
        return getattr(self.consumer, "pool", None)

    @property
    def keeper(self) -> Any:
        """The consumer's lease keeper (Redis), or None."""
        return getattr(self.consumer, "keeper", None)


#: Celery apps configured by ``ordered_worker`` in this process
#: (see :func:`~ordered_tasks.worker.launch.child.configure`).
ORDERED_WORKERS: weakref.WeakKeyDictionary[Celery, OrderedWorker] = weakref.WeakKeyDictionary()


def ordered_worker(app: Any) -> OrderedWorker | None:
    """What ``ordered_worker`` set up for ``app``, or None for an app it did not configure."""
    return ORDERED_WORKERS.get(app) if app is not None else None
