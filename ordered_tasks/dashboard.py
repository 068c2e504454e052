"""The figures of the partitions page: the broker's queues, the consumers' reports, key states."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Count, Q
from django.utils import timezone

from .brokerstats import BrokerUnavailable, QueueFigures, queue_figures
from .conf import get_settings
from .exceptions import ConfigurationError
from .health import SILENT_AFTER, STALL_AFTER
from .models import AccountState, PartitionStatus
from .partitioning import queue_name
from .states import KeyStatus


@dataclass
class PartitionRow:
    """One line of the partitions page."""

    partition: int
    queue: str
    depth: int | None
    oldest_age: float | None
    oldest_is_estimate: bool
    status: PartitionStatus | None
    report_age: float | None
    blocked: int
    retrying: int

    #: Seconds since a task of the partition last started or ended, while nothing runs.
    quiet_for: float | None = None

    @property
    def silent(self) -> bool:
        return self.report_age is None or self.report_age > SILENT_AFTER

    @property
    def stalled(self) -> bool:
        """Messages wait, nothing runs, and nothing moved for :data:`STALL_AFTER` seconds."""
        return bool(self.depth) and self.quiet_for is not None and self.quiet_for > STALL_AFTER


def broker_url() -> str:
    """The broker of the project's Celery app."""
    from .celery_app import find_celery_app

    url: str = find_celery_app().conf.broker_url or ""
    return url


def transport_options() -> dict[str, Any]:
    """The broker transport options of the project's Celery app (Sentinel's ``master_name``)."""
    from .celery_app import find_celery_app

    return dict(find_celery_app().conf.broker_transport_options or {})


def overview(now: datetime | None = None) -> tuple[list[PartitionRow], str | None]:
    """Every partition's row, and why the broker could not be asked (None if it answered)."""
    now = now or timezone.now()
    conf = get_settings()
    error = None
    try:
        queues = queue_figures(broker_url(), conf.queue_prefix, conf.partitions, transport_options())
    except (BrokerUnavailable, ConfigurationError) as exc:  # no broker, or no Celery app to ask
        queues, error = {}, str(exc)
    statuses = {s.partition: s for s in PartitionStatus.objects.filter(partition__lt=conf.partitions)}
    held = {
        row["partition"]: row for row in AccountState.objects.values("partition").annotate(
            blocked=Count("pk", filter=Q(status=KeyStatus.BLOCKED)),
            retrying=Count("pk", filter=Q(status=KeyStatus.RETRYING)))
    }
    rows = []
    for partition in range(conf.partitions):
        figures = queues.get(partition, QueueFigures())
        status = statuses.get(partition)
        oldest, estimate = figures.oldest_age, False
        if oldest is None and figures.depth and status is not None:
            oldest, estimate = status.last_wait, True
        counts: Any = held.get(partition, {})
        rows.append(PartitionRow(
            partition=partition, queue=queue_name(conf.queue_prefix, partition), depth=figures.depth,
            oldest_age=oldest, oldest_is_estimate=estimate, status=status,
            report_age=_age(now, status),
            blocked=counts.get("blocked", 0), retrying=counts.get("retrying", 0),
            quiet_for=_quiet_for(now, status),
        ))
    return rows, error


def _age(now: datetime, status: PartitionStatus | None) -> float | None:
    if status is None or status.heartbeat_at is None:
        return None
    return (now - status.heartbeat_at).total_seconds()


def _quiet_for(now: datetime, status: PartitionStatus | None) -> float | None:
    """Seconds since the consumer last started or ended a task of the partition, if nothing runs."""
    if status is None or status.running_task:
        return None
    since = status.progress_at or status.consumer_since
    return None if since is None else (now - since).total_seconds()
