"""Figures a worker reports for the partitions page, kept in memory and written in batches."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ...health import FLUSH_INTERVAL, STALL_AFTER
from ...options import KEY_HEADER, PUBLISHED_HEADER

logger = logging.getLogger(__name__)

#: At most this many keys get their ``last_activity`` written per batch.
MAX_KEYS_PER_FLUSH = 1000
#: Seconds between two broker queries of a worker that looks for stalled partitions,
#: and between two warnings about the same stall.
STALL_CHECK = 30.0
STALL_REPEAT = 300.0


@dataclass
class Running:
    """A task a partition's consumer is running."""

    task: str
    task_id: str
    key: str
    since: float


@dataclass
class PartitionFigures:
    """One partition's counters in this worker."""

    completed: int = 0
    failed: int = 0
    #: Task id -> the partition's tasks running now (several keys at once).
    running: dict[str, Running] = field(default_factory=dict)
    last_wait: float | None = None
    active: bool = False  #: ran something since the last write
    progress_at: float = 0.0  #: when a task last started or ended here (0: never)
    warned_at: float = 0.0  #: when its current stall was last logged
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
        #: Partitions that started a task since the broker connection was made (RabbitMQ:
        #: only the active consumer of a single-active-consumer queue gets messages).
        self.seen: set[int] = set()

    def _of(self, request: Any) -> tuple[int, PartitionFigures | None, str]:
        """The partition whose queue delivered the request's message, its figures, and the key."""
        from ..delivery import delivered_partition

        headers = getattr(request, "_request_dict", None) or {}
        partition = delivered_partition(headers)
        if partition < 0:
            return -1, None, ""
        figures = self.partitions.setdefault(partition, PartitionFigures())
        return partition, figures, str(headers.get(KEY_HEADER, ""))

    def started(self, request: Any) -> None:
        partition, figures, key = self._of(request)
        if figures is None:
            return
        now = time.time()
        published = (getattr(request, "_request_dict", None) or {}).get(PUBLISHED_HEADER)
        with self.lock:
            figures.running[request.id] = Running(request.name, request.id, key, now)
            figures.active = True
            figures.progress_at = now
            self.seen.add(partition)
            if isinstance(published, (int, float)):
                figures.last_wait = max(0.0, now - published)

    def ended(self, request: Any) -> None:
        """The request's message was acknowledged or rejected: it will not run here again."""
        _, figures, key = self._of(request)
        if figures is None:
            return
        with self.lock:
            figures.completed += 1
            figures.active = True
            figures.progress_at = time.time()
            figures.running.pop(request.id, None)
            if key:
                self.keys_done.add(key)

    def failed(self, request: Any) -> None:
        _, figures, _ = self._of(request)
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
                    # The longest-running task: the one to look at when the partition seems stuck.
                    running = min(figures.running.values(), key=lambda r: r.since, default=None)
                    rows.append({
                        "partition": partition, "completed": figures.completed, "failed": figures.failed,
                        "per_minute": round(rate, 1), "last_wait": figures.last_wait,
                        "running_task": running.task[:255] if running else "",
                        "running_task_id": running.task_id[:255] if running else "",
                        "running_key": running.key[:255] if running else "",
                        "running_since": _utc(running.since) if running else None,
                        "progress_at": _utc(figures.progress_at) if figures.progress_at else None,
                    })
                figures.active = False
        return rows, keys


    def new_tenure(self) -> None:
        """A new broker connection: the partitions this worker runs are not known yet."""
        with self.lock:
            self.seen.clear()

    def idle(self, owned: set[int], now: float) -> list[int]:
        """Owned partitions where nothing runs and nothing started or ended for :data:`STALL_AFTER`."""
        with self.lock:
            for partition in owned:  # first seen now (a takeover): quiet from now on
                self.partitions.setdefault(partition, PartitionFigures(progress_at=now))
            return sorted(p for p in owned if not self.partitions[p].running
                          and now - self.partitions[p].progress_at > STALL_AFTER)

    def stalls(self, owned: set[int], depths: dict[int, int | None],
               now: float) -> list[tuple[int, float, int]]:
        """``(partition, seconds without progress, depth)`` of each stall to log now.

        A stall is logged when it is found, then every :data:`STALL_REPEAT` seconds.
        """
        found = []
        idle = set(self.idle(owned, now))
        with self.lock:
            for partition in sorted(owned):
                figures = self.partitions[partition]
                depth = depths.get(partition)
                if partition not in idle or not depth:
                    figures.warned_at = 0.0
                    continue
                if now - figures.warned_at >= STALL_REPEAT:
                    figures.warned_at = now
                    found.append((partition, now - figures.progress_at, depth))
        return found


def _utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


FIGURES = Figures()


def write(figures: Figures, owned: set[int]) -> None:
    """Write one batch: the rows of the partitions this worker consumes, and ``last_activity``.

    At most four queries, however many tasks ran since the last batch.
    """
    from django.utils import timezone

    from ...models import AccountState, PartitionStatus

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


def warn_about_stalls(figures: Figures, owned: set[int], broker_url: str, now: float,
                      transport_options: dict[str, Any] | None = None) -> None:
    """Log each owned partition whose queue holds messages while nothing moved for a while.

    The broker is asked only when some owned partition has been idle for
    :data:`STALL_AFTER` seconds, so a busy worker never asks.
    """
    from ...brokerstats import BrokerUnavailable, queue_figures
    from ...conf import get_settings

    if not figures.idle(owned, now):
        return
    conf = get_settings()
    try:
        queues = queue_figures(broker_url, conf.queue_prefix, conf.partitions, transport_options)
    except BrokerUnavailable as exc:
        logger.warning("Could not ask the broker for the depth of idle partitions: %s", exc)
        return
    depths = {partition: queue.depth for partition, queue in queues.items()}
    for partition, quiet, depth in figures.stalls(owned, depths, now):
        logger.warning(
            "Partition %d has not moved for %.0f s although its queue holds %d message(s), and "
            "this worker runs nothing of it. Look for errors above (broker or database), check "
            "the partitions page of the admin, and restart this worker if it persists.",
            partition, quiet, depth)


def start_reporting(worker: str, broker_url: str = "",
                    transport_options: dict[str, Any] | None = None,
                    keeper: Callable[[], Any] = lambda: None) -> threading.Thread:
    """Start the thread that writes this worker's figures every :data:`FLUSH_INTERVAL` seconds.

    Every :data:`STALL_CHECK` seconds it also looks for stalled partitions
    (see :func:`warn_about_stalls`). ``keeper`` returns the worker's lease
    keeper (Redis), whose partitions are the ones it owns.
    """
    FIGURES.worker = worker

    def run() -> None:
        from django.db import close_old_connections

        checked = time.monotonic()
        while True:
            time.sleep(FLUSH_INTERVAL)
            leases = keeper()
            close_old_connections()
            owned = set(leases.consuming) if leases is not None else set(FIGURES.seen)
            try:
                write(FIGURES, set(leases.consuming) if leases is not None else set())
                if broker_url and time.monotonic() - checked >= STALL_CHECK:
                    checked = time.monotonic()
                    warn_about_stalls(FIGURES, owned, broker_url, time.time(), transport_options)
            except Exception as exc:
                logger.warning("Could not write the partition figures: %r", exc)

    thread = threading.Thread(target=run, name="ordered-figures", daemon=True)
    thread.start()
    return thread
