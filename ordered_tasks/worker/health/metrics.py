"""Prometheus metrics of one ordered worker process, per partition (never per key), served over HTTP."""

from __future__ import annotations

import bisect
import logging
import math
import mmap
import multiprocessing
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ...exceptions import ConfigurationError

logger = logging.getLogger(__name__)

#: What to install for the metrics (the ``metrics`` extra of the package).
INSTALL = 'pip install "django-ordered-tasks[metrics]"'
#: Seconds between two reads of the database (key states) and the broker (queues) for the gauges.
REFRESH_INTERVAL = 10.0
#: Upper bounds, in seconds, of the buckets of the task duration histogram.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Room for this many reasons a message is parked for (``ParkedMessage.Reason``, read at start).
MAX_REASONS = 32
#: Seconds a count waits for the counters' lock (held for microseconds); after that, the process
#: counts without it for :data:`UNLOCKED_FOR` seconds.
LOCK_WAIT = 1.0
UNLOCKED_FOR = 60.0

# The counters of one partition, in the order of their slots in the shared memory.
SUCCEEDED, FAILED, RETRIED, REPLAYS, SKIPS = range(5)
FENCE_REFUSED, LEASE_REFUSED = 5, 6  #: a stale fencing token; a start after the lease may have lapsed
ACK_CONNECTION_CLOSED, ACK_REDIS_ERROR = 7, 8
OWNERSHIP_GAINED, OWNERSHIP_LOST = 9, 10
_PARKED = 11
_BUCKETS = _PARKED + MAX_REASONS
_DURATION_SUM = _BUCKETS + len(DURATION_BUCKETS) + 1  # the last bucket is +Inf
_DURATION_COUNT = _DURATION_SUM + 1
SLOTS = _DURATION_COUNT + 1

_SLOT = struct.Struct("d")
_ROW = struct.Struct(f"{SLOTS}d")

#: Counter name (without ``_total``) -> (help, label, {label value: slot}); no label: one slot.
#: The parked messages' slots, one per reason, are :attr:`Tally.reasons`.
COUNTERS: dict[str, tuple[str, str, dict[str, int]]] = {
    "ordered_tasks_tasks_succeeded": (
        "Runs of ordered tasks that returned, also of parked messages run again by a retry or replay.",
        "", {"": SUCCEEDED}),
    "ordered_tasks_tasks_failed": (
        "Runs of ordered tasks that raised with no retry left (the key blocked, or the failure "
        "recorded under the continue policy).", "", {"": FAILED}),
    "ordered_tasks_tasks_retried": ("In-place retries scheduled.", "", {"": RETRIED}),
    "ordered_tasks_messages_parked": ("Messages parked in the database, by reason.", "reason", {}),
    "ordered_tasks_replays": ("Replays of a key applied.", "", {"": REPLAYS}),
    "ordered_tasks_skips": ("Skips of a key's failed message applied.", "", {"": SKIPS}),
    "ordered_tasks_fencing_rejections": (
        "Changes refused to this worker because it may have lost the partition: check=fence, the "
        "database refused a stale fencing token; check=lease, a start refused as the lease may "
        "have lapsed.", "check", {"fence": FENCE_REFUSED, "lease": LEASE_REFUSED}),
    "ordered_tasks_acknowledgements_failed": (
        "Acknowledgements or rejects that did not reach the broker: the connection had closed, or "
        "Redis did not take them (sent again every second).", "cause",
        {"connection_closed": ACK_CONNECTION_CLOSED, "redis_error": ACK_REDIS_ERROR}),
    "ordered_tasks_partition_ownership_changes": (
        "Times this worker started or stopped being the partition's consumer.", "change",
        {"gained": OWNERSHIP_GAINED, "lost": OWNERSHIP_LOST}),
}
#: Gauge name -> help; each has a ``partition`` label, except those in :data:`WORKER_GAUGES`.
GAUGES: dict[str, str] = {
    "ordered_tasks_partition_owned": (
        "1 while this worker consumes the partition (Redis: holds its lease; RabbitMQ: received a "
        "message of it since it connected), else 0; one series per partition the worker serves."),
    "ordered_tasks_tasks_running": "Tasks of the partition running in this worker now.",
    "ordered_tasks_last_progress_timestamp_seconds": (
        "Unix time at which a task of the partition last started or ended in this worker."),
    "ordered_tasks_last_wait_seconds": "Seconds the last task started waited between publish and start.",
    "ordered_tasks_queue_messages": (
        "Messages waiting in the partition's queue (Redis: with those set aside for busy keys)."),
    "ordered_tasks_queue_oldest_message_age_seconds": (
        "Seconds the oldest message at the head of the partition's queue, or of a busy key's messages "
        "set aside, has waited (Redis only; 0 if empty)."),
    "ordered_tasks_keys_blocked": "Keys of the partition blocked by a failure.",
    "ordered_tasks_keys_retrying": "Keys of the partition waiting for an in-place retry or a replay.",
    "ordered_tasks_blocked_key_max_age_seconds": (
        "Seconds the longest-blocked key of the partition has been blocked."),
    "ordered_tasks_parked_messages": (
        "Messages of the partition parked in the database, waiting for their key."),
    "ordered_tasks_broker_up": "1 if the broker answered the last query of queue depths, else 0.",
    "ordered_tasks_database_up": "1 if the database answered the last query of key states, else 0.",
    "ordered_tasks_partitions": "The PARTITIONS setting: how many partitions there are in all.",
}
WORKER_GAUGES = frozenset({"ordered_tasks_broker_up", "ordered_tasks_database_up",
                           "ordered_tasks_partitions"})
HISTOGRAM = "ordered_tasks_task_duration_seconds"
HISTOGRAM_HELP = "Seconds each run of an ordered task took (its own code, whatever the outcome)."
#: Every series name the exporter can show (counters with ``_total``, the histogram's three).
METRIC_NAMES = frozenset({
    *(f"{name}_total" for name in COUNTERS), *GAUGES,
    *(f"{HISTOGRAM}{suffix}" for suffix in ("_bucket", "_sum", "_count")),
})


def require_client() -> None:
    """Raise :class:`~ordered_tasks.ConfigurationError` unless ``prometheus_client`` is installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "ORDERED_TASKS['METRICS_PORT'] (or ordered_worker --metrics-port) asks for Prometheus "
            f"metrics, but prometheus_client is not installed: {INSTALL}, or leave METRICS_PORT "
            "out.") from None


class Tally:
    """The counters of every partition, in memory shared by a worker and its pool processes.

    Made before the pool forks, like the key book's counters, so that a
    count made where an outcome is known (a pool process, a pool thread,
    the side thread or the event loop) is seen by the worker's main process,
    which serves the metrics: no multiprocess mode, no files. One lock made
    before the fork guards the counts; a process that finds it held for
    :data:`LOCK_WAIT` seconds (its holder was killed) counts without it for
    a while, risking a lost count rather than a stalled task.
    """

    def __init__(self) -> None:
        self._memory: mmap.mmap | None = None
        self._lock: Any = None
        self._unlocked_until = 0.0
        self.partitions = 0
        #: Reason a message is parked for -> its slot.
        self.reasons: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self._memory is not None

    def share(self, partitions: int) -> None:
        """Make the shared memory (before the pool forks): counting starts."""
        from ...models import ParkedMessage

        reasons = list(ParkedMessage.Reason.values)[:MAX_REASONS]
        self.reasons = {reason: _PARKED + index for index, reason in enumerate(reasons)}
        self.partitions = partitions
        self._memory = mmap.mmap(-1, _ROW.size * max(partitions, 1))
        self._lock = multiprocessing.Lock()
        self._unlocked_until = 0.0

    def stop(self) -> None:
        """Count nothing from now on (tests)."""
        self._memory = None

    def _acquire(self) -> bool:
        if time.monotonic() < self._unlocked_until:
            return False
        if self._lock.acquire(timeout=LOCK_WAIT):
            return True
        self._unlocked_until = time.monotonic() + UNLOCKED_FOR
        logger.warning("The metrics counters' lock was not released within %.1f s (a pool process died "
                       "holding it?); counting without it for %.0f s.", LOCK_WAIT, UNLOCKED_FOR)
        return False

    def add(self, partition: int, *slots: tuple[int, float]) -> None:
        """Add each ``(slot, amount)`` to ``partition``'s counters."""
        memory = self._memory
        if memory is None or not 0 <= partition < self.partitions:
            return
        base = partition * _ROW.size
        locked = self._acquire()
        try:
            for slot, amount in slots:
                offset = base + slot * _SLOT.size
                _SLOT.pack_into(memory, offset, _SLOT.unpack_from(memory, offset)[0] + amount)
        finally:
            if locked:
                self._lock.release()

    def row(self, partition: int) -> tuple[float, ...]:
        """Every counter of ``partition`` (zeros when counting is off)."""
        memory = self._memory
        if memory is None or not 0 <= partition < self.partitions:
            return (0.0,) * SLOTS
        return _ROW.unpack_from(memory, partition * _ROW.size)


#: The counters of this worker and its pool processes.
TALLY = Tally()


def count(partition: int, slot: int, amount: float = 1.0) -> None:
    """Count an event of ``partition`` (``slot`` is :data:`SUCCEEDED`, :data:`FAILED` and so on)."""
    if TALLY.enabled:
        TALLY.add(partition, (slot, amount))


def parked(partition: int, reason: str, messages: int = 1) -> None:
    """``messages`` messages of ``partition`` were parked (stored) for ``reason``."""
    slot = TALLY.reasons.get(reason)
    if TALLY.enabled and messages and slot is not None:
        TALLY.add(partition, (slot, float(messages)))


def task_ran(partition: int, seconds: float) -> None:
    """A task of ``partition`` ran for ``seconds`` (any outcome)."""
    if TALLY.enabled:
        bucket = bisect.bisect_left(DURATION_BUCKETS, seconds)
        TALLY.add(partition, (_BUCKETS + bucket, 1.0), (_DURATION_SUM, seconds), (_DURATION_COUNT, 1.0))


def acknowledgement_failed(holder: Any, delivery_tag: Any, cause: int) -> None:
    """An acknowledgement did not reach the broker (``holder``: the Redis channel or its QoS).

    ``cause`` is :data:`ACK_CONNECTION_CLOSED` or :data:`ACK_REDIS_ERROR`.
    """
    if not TALLY.enabled:
        return
    from ..delivery import queue_partition

    qos = getattr(holder, "qos", holder)
    message = (getattr(qos, "_delivered", None) or {}).get(delivery_tag)
    partition = queue_partition(getattr(message, "delivery_info", None))
    if partition is None:  # the message's queue, as the window counts it
        queue = (getattr(qos, "_placed", None) or {}).get(delivery_tag)
        partition = queue_partition({"routing_key": queue})
    if partition is not None:
        TALLY.add(partition, (cause, 1.0))


@dataclass
class Ownership:
    """Main process: which partitions this worker consumes, by the events that change it."""

    owned: dict[int, bool] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, partition: int, owned: bool) -> None:
        """``partition`` is (or is no longer) this worker's; a change is counted."""
        with self.lock:
            changed = self.owned.get(partition, False) != owned
            self.owned[partition] = owned
        if changed:
            count(partition, OWNERSHIP_GAINED if owned else OWNERSHIP_LOST)

    def lose_all(self) -> None:
        """A new broker connection (RabbitMQ): a partition is this worker's again once a message arrives."""
        for partition in [p for p, owned in self.owned.items() if owned]:
            self.set(partition, False)

    def of(self, partition: int) -> bool:
        return self.owned.get(partition, False)


OWNERSHIP = Ownership()


def partition_owned(partition: int, owned: bool) -> None:
    """Main process: this worker started (True) or stopped (False) consuming ``partition``."""
    if TALLY.enabled:
        OWNERSHIP.set(partition, owned)


def connection_replaced() -> None:
    """Main process, RabbitMQ: a new connection; a partition is ours again once a message of it arrives."""
    if TALLY.enabled:
        OWNERSHIP.lose_all()


@dataclass
class Readings:
    """What the refresh thread last read from the database and the broker, per partition."""

    database_up: bool = False
    blocked: dict[int, int] = field(default_factory=dict)
    retrying: dict[int, int] = field(default_factory=dict)
    blocked_since: dict[int, float] = field(default_factory=dict)  #: Unix time of the oldest block
    parked: dict[int, int] = field(default_factory=dict)
    broker_up: bool = False
    depth: dict[int, int] = field(default_factory=dict)
    oldest_age: dict[int, float] = field(default_factory=dict)


def read_key_states(partitions: list[int], readings: Readings) -> None:
    """Blocked and retrying keys and parked messages of ``partitions``: two queries on indexed columns."""
    from django.db.models import Count, Min

    from ...models import AccountState, ParkedMessage
    from ...states import KeyStatus

    held = AccountState.objects.filter(partition__in=partitions,
                                       status__in=[KeyStatus.BLOCKED, KeyStatus.RETRYING]).order_by()
    blocked: dict[int, int] = {}
    retrying: dict[int, int] = {}
    since: dict[int, float] = {}
    for row in held.values("partition", "status").annotate(keys=Count("pk"), since=Min("blocked_at")):
        if row["status"] == KeyStatus.BLOCKED:
            blocked[row["partition"]] = row["keys"]
            if row["since"] is not None:
                since[row["partition"]] = row["since"].timestamp()
        else:
            retrying[row["partition"]] = row["keys"]
    # A key with parked messages is never active, so the held keys find them through the key index.
    parked = dict(ParkedMessage.objects.filter(key__in=held.values("key"), state=ParkedMessage.State.PARKED)
                  .order_by().values("partition").annotate(n=Count("pk")).values_list("partition", "n"))
    readings.blocked, readings.retrying, readings.blocked_since = blocked, retrying, since
    readings.parked = parked
    readings.database_up = True


def read_queues(partitions: list[int], readings: Readings, broker_url: str,
                transport_options: dict[str, Any] | None) -> None:
    """Depth and head age of the queues of ``partitions``, in one broker connection (2 s timeout)."""
    from ...brokerstats import queue_figures
    from ...conf import get_settings
    from ...coordination import is_redis

    conf = get_settings()
    figures = queue_figures(broker_url, conf.queue_prefix, conf.partitions, transport_options,
                            only=partitions)
    readings.depth = {p: q.depth for p, q in figures.items() if q.depth is not None}
    oldest: dict[int, float] = {}
    for partition, queue in figures.items():
        if not is_redis(broker_url):  # RabbitMQ cannot show the head of a queue without taking it
            break
        if queue.depth == 0:
            oldest[partition] = 0.0
        elif queue.oldest_age is not None:
            oldest[partition] = queue.oldest_age
    readings.oldest_age = oldest
    readings.broker_up = True


@dataclass(eq=False)
class Exporter:
    """The metrics of one worker process: counters from :data:`TALLY`, gauges read now and then.

    A scrape reads memory only (the shared counters, the worker's figures,
    the last readings): it never waits for the broker or the database.
    """

    partitions: list[int]
    broker_url: str = ""
    transport_options: dict[str, Any] | None = None
    readings: Readings = field(default_factory=Readings)
    tally: Tally = field(default_factory=lambda: TALLY)
    ownership: Ownership = field(default_factory=lambda: OWNERSHIP)

    def refresh(self) -> None:
        """Read the key states and the queues of the partitions (refresh thread)."""
        from ...brokerstats import BrokerUnavailable

        try:
            read_key_states(self.partitions, self.readings)
        except Exception as exc:
            logger.warning("Could not read the key states for the metrics: %r", exc)
            self.readings.database_up = False
            self.readings.blocked, self.readings.retrying, self.readings.parked = {}, {}, {}
            self.readings.blocked_since = {}
        if not self.broker_url:
            return
        try:
            read_queues(self.partitions, self.readings, self.broker_url, self.transport_options)
        except (BrokerUnavailable, ConfigurationError) as exc:
            logger.warning("Could not ask the broker for the queue depths for the metrics: %s", exc)
            self.readings.broker_up = False
            self.readings.depth, self.readings.oldest_age = {}, {}

    def collect(self) -> Iterator[Any]:
        """The metric families of a scrape (``prometheus_client``'s collector protocol)."""
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        rows = {p: self.tally.row(p) for p in self.partitions}
        for name, (text, label, slots) in COUNTERS.items():
            slots = slots or self.tally.reasons
            family = CounterMetricFamily(name, text, labels=["partition", *([label] if label else [])])
            for partition, row in rows.items():
                for value, slot in slots.items():
                    if row[slot] or not label:  # a labelled counter appears once it counted
                        family.add_metric([str(partition), *([value] if label else [])], row[slot])
            yield family
        histogram = HistogramMetricFamily(HISTOGRAM, HISTOGRAM_HELP, labels=["partition"])
        for partition, row in rows.items():
            if row[_DURATION_COUNT]:
                cumulative, buckets = 0.0, []
                for index, bound in enumerate((*DURATION_BUCKETS, math.inf)):
                    cumulative += row[_BUCKETS + index]
                    buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
                histogram.add_metric([str(partition)], buckets, row[_DURATION_SUM])
        yield histogram
        yield from self._gauges()

    def _gauges(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from ...conf import get_settings
        from .figures import FIGURES

        values: dict[str, dict[int, float]] = {name: {} for name in GAUGES if name not in WORKER_GAUGES}
        now = time.time()
        with FIGURES.lock:
            for partition in self.partitions:
                figures = FIGURES.partitions.get(partition)
                values["ordered_tasks_tasks_running"][partition] = len(figures.running) if figures else 0
                if figures is not None and figures.progress_at:
                    values["ordered_tasks_last_progress_timestamp_seconds"][partition] = figures.progress_at
                if figures is not None and figures.last_wait is not None:
                    values["ordered_tasks_last_wait_seconds"][partition] = figures.last_wait
        readings = self.readings
        for partition in self.partitions:
            values["ordered_tasks_partition_owned"][partition] = float(self.ownership.of(partition))
            if readings.database_up:
                values["ordered_tasks_keys_blocked"][partition] = readings.blocked.get(partition, 0)
                values["ordered_tasks_keys_retrying"][partition] = readings.retrying.get(partition, 0)
                values["ordered_tasks_parked_messages"][partition] = readings.parked.get(partition, 0)
        for partition, since in readings.blocked_since.items():
            values["ordered_tasks_blocked_key_max_age_seconds"][partition] = max(0.0, now - since)
        values["ordered_tasks_queue_messages"].update(readings.depth)
        values["ordered_tasks_queue_oldest_message_age_seconds"].update(readings.oldest_age)
        for name, series in values.items():
            family = GaugeMetricFamily(name, GAUGES[name], labels=["partition"])
            for partition in sorted(series):
                family.add_metric([str(partition)], float(series[partition]))
            yield family
        yield GaugeMetricFamily("ordered_tasks_broker_up", GAUGES["ordered_tasks_broker_up"],
                                value=float(readings.broker_up))
        yield GaugeMetricFamily("ordered_tasks_database_up", GAUGES["ordered_tasks_database_up"],
                                value=float(readings.database_up))
        yield GaugeMetricFamily("ordered_tasks_partitions", GAUGES["ordered_tasks_partitions"],
                                value=float(get_settings().partitions))

    def registry(self) -> Any:
        """A registry with these metrics and the process's own (CPU, memory, file descriptors)."""
        from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry

        registry = CollectorRegistry()
        for collector in (self, PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)  # type: ignore[arg-type]
        return registry


def prepare(partitions: int) -> None:
    """Before the pool forks: check that ``prometheus_client`` is there, and start counting."""
    require_client()
    TALLY.share(partitions)


def serve(port: int, partitions: Iterable[int], broker_url: str = "",
          transport_options: dict[str, Any] | None = None, address: str = "") -> Exporter:
    """Serve this worker's metrics on ``port`` and read the gauges every :data:`REFRESH_INTERVAL` seconds.

    A port that cannot be bound is logged; the worker runs on without metrics.
    """
    from prometheus_client import start_http_server

    exporter = Exporter(sorted(partitions), broker_url, transport_options)
    for partition in exporter.partitions:  # every served partition has its series from the start
        OWNERSHIP.owned.setdefault(partition, False)
    try:
        start_http_server(port, addr=address or "0.0.0.0", registry=exporter.registry())
    except OSError as exc:
        logger.error("Could not serve the Prometheus metrics on port %d: %s. This worker runs on without "
                     "them; check ORDERED_TASKS['METRICS_PORT'] and the other workers on this host.",
                     port, exc)
        return exporter

    def run() -> None:
        from django.db import close_old_connections

        while True:
            close_old_connections()  # a connection broken by a database outage is not kept
            try:
                exporter.refresh()
            except Exception as exc:  # never let the thread die
                logger.warning("Could not refresh the metrics: %r", exc)
            time.sleep(REFRESH_INTERVAL)

    threading.Thread(target=run, name="ordered-metrics", daemon=True).start()
    logger.info("Serving Prometheus metrics of partitions %s on port %d.", exporter.partitions, port)
    return exporter
