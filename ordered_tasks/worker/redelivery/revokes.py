"""Revokes of ordered tasks survive a worker restart: kept in the database, loaded at start-up."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state
from django.db import DatabaseError, close_old_connections
from django.utils import timezone

logger = logging.getLogger(__name__)

#: Seconds between two looks at the worker's revoked ids (a changed count triggers a write).
SYNC_INTERVAL = 1.0
#: Every this many seconds the ids are written even if their count did not change.
FULL_SYNC_EVERY = 60.0
#: How long a revoke is kept (Celery keeps its in-memory revokes for 3 hours).
KEEP_FOR = timedelta(days=1)


def load() -> int:
    """Add the revokes kept in the database to this worker's revoked ids; return how many."""
    from ...models import RevokedTask

    ids = list(RevokedTask.objects.filter(revoked_at__gte=timezone.now() - KEEP_FOR)
               .values_list("task_id", flat=True))
    worker_state.revoked.update(ids)
    if ids:
        logger.info("Honouring %d revoke(s) kept from before this worker started.", len(ids))
    return len(ids)


def is_revoked(task_id: str) -> bool:
    """Whether ``task_id`` was revoked (in this worker, or kept in the database)."""
    from ...models import RevokedTask

    return task_id in worker_state.revoked or RevokedTask.objects.filter(task_id=task_id).exists()


class Keeper:
    """Writes the ids this worker was told to revoke into the database, soon after it was told."""

    def __init__(self) -> None:
        self.written: set[str] = set()
        self.count = -1
        self.synced_at = 0.0

    def sync(self) -> None:
        """Write the revoked ids not written yet (event loop, from a timer); errors are logged."""
        from ...models import RevokedTask

        revoked = worker_state.revoked
        now = time.monotonic()
        if len(revoked) == self.count and now - self.synced_at < FULL_SYNC_EVERY:
            return
        self.count, self.synced_at = len(revoked), now
        current = set(revoked)
        self.written &= current  # bounded like Celery's own set
        new = [task_id for task_id in current if task_id not in self.written]
        if not new:
            return
        close_old_connections()
        try:
            RevokedTask.objects.bulk_create([RevokedTask(task_id=task_id[:255]) for task_id in new],
                                            ignore_conflicts=True)
            RevokedTask.objects.filter(revoked_at__lt=timezone.now() - KEEP_FOR).delete()
        except DatabaseError as exc:
            self.count = -1  # try again at the next look
            logger.warning("Could not keep %d revoke(s) in the database: %r", len(new), exc)
            return
        self.written.update(new)


class DurableRevokes(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: load kept revokes before consuming, and keep new ones.

    Celery keeps revoked ids in worker memory only (``--statedb``, which
    would keep them in a file, is refused for ordered workers): a waiting
    ordered task revoked before a restart would run after it.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.keeper = Keeper()
        self.tref: Any = None

    def start(self, c: Any) -> None:
        if self.tref is None:
            try:
                load()
            except DatabaseError as exc:
                logger.warning("Could not load the kept revokes: %r", exc)
            self.tref = c.timer.call_repeatedly(SYNC_INTERVAL, self.keeper.sync, priority=5)

    def stop(self, c: Any) -> None:
        self.keeper.sync()

    def shutdown(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
