"""Figures a worker reports for the partitions page, kept in memory and written in batches."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..options import KEY_HEADER, PARTITION_HEADER, PUBLISHED_HEADER

logger = logging.getLogger(__name__)

#: Seconds between two writes of a worker's figures.
FLUSH_INTERVAL = 5.0
#: At most this many keys get their ``last_activity`` written per batch.
MAX_KEYS_PER_FLUSH = 1000


@dataclass
class Running:
    """The task a partition's consumer is running."""

    task: str
    task_id: str
    key: str
    since: float


@dataclass
class PartitionFigures:
    """One partition's counters in this worker."""

    completed: int = 0
    failed: int = 0
    running: Running | None = None
    last_wait: float | None = None
    active: bool = False  #: ran something since the last write
    #: (time, completed) at each write over the last minute, for the rate.
    history: deque[tuple[float, int]] = field(default_factory=lambda: deque([(time.time(), 0)], maxlen=64))


class Figures:
    """Counters of the tasks this worker ran, per partition; nothing here touches the database.

    The worker's main process updates them as requests start and end (a few
    dictionary operations per task); a thread writes them every
    :data:`FLUSH_INTERVAL` seconds, in one query per table.
    """

    def __init__(self) -> None:
        self.partitions: dict[int, PartitionFigures] = {}
        self.keys_done: set[str] = set()
        self.lock = threading.Lock()
        self.worker = ""

    def _of(self, request: Any) -> tuple[PartitionFigures | None, str]:
        headers = getattr(request, "_request_dict", None) or {}
        partition = headers.get(PARTITION_HEADER)
        if partition is None:
            return None, ""
        figures = self.partitions.setdefault(int(partition), PartitionFigures())
        return figures, str(headers.get(KEY_HEADER, ""))

    def started(self, request: Any) -> None:
        figures, key = self._of(request)
        if figures is None:
            return
        now = time.time()
        published = (getattr(request, "_request_dict", None) or {}).get(PUBLISHED_HEADER)
        with self.lock:
            figures.running = Running(request.name, request.id, key, now)
            figures.active = True
            if isinstance(published, (int, float)):
                figures.last_wait = max(0.0, now - published)

    def ended(self, request: Any) -> None:
        """The request's message was acknowledged or rejected: it will not run here again."""
        figures, key = self._of(request)
        if figures is None:
            return
        with self.lock:
            figures.completed += 1
            figures.active = True
            if figures.running is not None and figures.running.task_id == request.id:
                figures.running = None
            if key:
                self.keys_done.add(key)

    def failed(self, request: Any) -> None:
        figures, _ = self._of(request)
        if figures is not None:
            with self.lock:
                figures.failed += 1

    def snapshot(self, owned: set[int]) -> tuple[list[dict[str, Any]], list[str]]:
        """The rows to write for ``owned`` partitions and the keys active since the last write."""
        now = time.time()
        rows = []
        with self.lock:
            keys, self.keys_done = list(self.keys_done)[:MAX_KEYS_PER_FLUSH], set()
            for partition in owned:
                self.partitions.setdefault(partition, PartitionFigures())
            for partition, figures in self.partitions.items():
                figures.history.append((now, figures.completed))
                while len(figures.history) > 2 and now - figures.history[1][0] >= 60:
                    figures.history.popleft()
                first_at, first_count = figures.history[0]
                elapsed = now - first_at
                rate = (figures.completed - first_count) * 60 / elapsed if elapsed > 0 else 0.0
                if partition in owned or figures.active:
                    running = figures.running
                    rows.append({
                        "partition": partition, "completed": figures.completed, "failed": figures.failed,
                        "per_minute": round(rate, 1), "last_wait": figures.last_wait,
                        "running_task": running.task[:255] if running else "",
                        "running_task_id": running.task_id[:255] if running else "",
                        "running_key": running.key[:255] if running else "",
                        "running_since": _utc(running.since) if running else None,
                    })
                figures.active = False
        return rows, keys


def _utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


FIGURES = Figures()


def write(figures: Figures, owned: set[int]) -> None:
    """Write one batch: the rows of the partitions this worker consumes, and ``last_activity``.

    At most four queries, however many tasks ran since the last batch.
    """
    from django.utils import timezone

    from ..models import AccountState, PartitionStatus

    rows, keys = figures.snapshot(owned)
    now = timezone.now()
    if rows:
        numbers = [row["partition"] for row in rows]
        rows_now = PartitionStatus.objects.filter(partition__in=numbers)
        previous = dict(rows_now.values_list("partition", "worker"))
        PartitionStatus.objects.bulk_create(
            [PartitionStatus(worker=figures.worker, heartbeat_at=now, **row) for row in rows],
            update_conflicts=True, unique_fields=["partition"],
            update_fields=["worker", "heartbeat_at", *(name for name in rows[0] if name != "partition")])
        taken = [n for n in numbers if previous.get(n) != figures.worker]
        if taken:
            PartitionStatus.objects.filter(partition__in=taken).update(consumer_since=now)
    if keys:
        AccountState.objects.filter(key__in=keys).update(last_activity=now)


def start_reporting(worker: str) -> threading.Thread:
    """Start the thread that writes this worker's figures every :data:`FLUSH_INTERVAL` seconds."""
    from .consumer import current_keeper

    FIGURES.worker = worker

    def run() -> None:
        from django.db import close_old_connections

        while True:
            time.sleep(FLUSH_INTERVAL)
            keeper = current_keeper()
            close_old_connections()
            try:
                write(FIGURES, set(keeper.consuming) if keeper is not None else set())
            except Exception as exc:
                logger.warning("Could not write the partition figures: %r", exc)

    thread = threading.Thread(target=run, name="ordered-figures", daemon=True)
    thread.start()
    return thread
