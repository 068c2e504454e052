"""Prometheus metrics of the ordered workers: counts, gauges, the endpoint, the dashboard and the alerts."""

from __future__ import annotations

import json
import multiprocessing
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import celery
import pytest
import redis
from celery import Celery
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from ordered_tasks import partition_for
from ordered_tasks.exceptions import ConfigurationError
from ordered_tasks.management.commands.ordered_worker import Command
from ordered_tasks.models import AccountState, ParkedMessage
from ordered_tasks.worker.health import metrics
from ordered_tasks.worker.health.figures import FIGURES, PartitionFigures
from tests.conftest import ROOT, eventually, wait_done
from tests.support.workload import fail, parked, publish, same_partition_keys

DASHBOARD = ROOT / "monitoring" / "grafana" / "ordered_tasks.json"
ALERTS = ROOT / "monitoring" / "prometheus" / "ordered_tasks_alerts.yml"
ALERT_TESTS = ROOT / "monitoring" / "prometheus" / "ordered_tasks_alerts_test.yml"
#: Every label an ordered_tasks series may carry: never a key.
LABELS = {"partition", "reason", "check", "cause", "change", "le"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def client() -> Any:
    return pytest.importorskip("prometheus_client")


@pytest.fixture
def counting(client: Any) -> Iterator[metrics.Tally]:
    """Counting on, for 8 partitions, in this process; off again afterwards."""
    metrics.TALLY.share(8)
    metrics.OWNERSHIP.owned.clear()
    yield metrics.TALLY
    metrics.TALLY.stop()
    metrics.OWNERSHIP.owned.clear()


def parse(text: str) -> Samples:
    """The samples of an exposition, by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(exporter: metrics.Exporter) -> Samples:
    from prometheus_client import generate_latest

    return parse(generate_latest(exporter.registry()).decode())


def value(samples: Samples, name: str, **labels: Any) -> float | None:
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))))


def total(samples: Samples, name: str, **labels: Any) -> float:
    """The sum of the series of ``name`` whose labels include ``labels``."""
    wanted = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= set(found))


def names_in(samples: Samples) -> set[str]:
    return {name for name, _ in samples if name.startswith("ordered_tasks_")}


# Counting ------------------------------------------------------------------------------------------

def test_each_count_shows_in_a_scrape_under_its_partition_and_label(counting: metrics.Tally) -> None:
    metrics.count(3, metrics.SUCCEEDED)
    metrics.count(3, metrics.SUCCEEDED)
    metrics.count(5, metrics.SUCCEEDED)
    metrics.count(3, metrics.FAILED)
    metrics.count(5, metrics.RETRIED)
    metrics.count(3, metrics.REPLAYS)
    metrics.count(5, metrics.SKIPS)
    metrics.count(3, metrics.FENCE_REFUSED)
    metrics.count(5, metrics.LEASE_REFUSED)
    metrics.parked(3, "key_held", 2)
    metrics.parked(3, "failed")
    metrics.parked(5, "overflow", 4)
    metrics.count(9, metrics.SUCCEEDED)  # not a partition: ignored
    samples = scrape(metrics.Exporter([3, 5]))
    assert value(samples, "ordered_tasks_tasks_succeeded_total", partition=3) == 2
    assert value(samples, "ordered_tasks_tasks_succeeded_total", partition=5) == 1
    assert value(samples, "ordered_tasks_tasks_failed_total", partition=3) == 1
    assert value(samples, "ordered_tasks_tasks_failed_total", partition=5) == 0  # unlabelled: always there
    assert value(samples, "ordered_tasks_tasks_retried_total", partition=5) == 1
    assert value(samples, "ordered_tasks_replays_total", partition=3) == 1
    assert value(samples, "ordered_tasks_skips_total", partition=5) == 1
    assert value(samples, "ordered_tasks_fencing_rejections_total", partition=3, check="fence") == 1
    assert value(samples, "ordered_tasks_fencing_rejections_total", partition=5, check="lease") == 1
    assert value(samples, "ordered_tasks_fencing_rejections_total", partition=3, check="lease") is None
    assert value(samples, "ordered_tasks_messages_parked_total", partition=3, reason="key_held") == 2
    assert value(samples, "ordered_tasks_messages_parked_total", partition=3, reason="failed") == 1
    assert value(samples, "ordered_tasks_messages_parked_total", partition=5, reason="overflow") == 4
    assert total(samples, "ordered_tasks_messages_parked_total") == 7
    assert {p for (n, labels), _ in samples.items() if n.startswith("ordered_tasks_tasks_")
            for k, p in labels if k == "partition"} == {"3", "5"}
    assert {k for (n, labels) in samples if n.startswith("ordered_tasks_") for k, _ in labels} <= LABELS


def test_durations_fill_cumulative_buckets_whose_bounds_are_inclusive(counting: metrics.Tally) -> None:
    for seconds in (0.005, 0.03, 0.03, 2.0, 400.0):
        metrics.task_ran(1, seconds)
    samples = scrape(metrics.Exporter([1, 2]))
    bucket = "ordered_tasks_task_duration_seconds_bucket"
    assert value(samples, bucket, partition=1, le="0.005") == 1
    assert value(samples, bucket, partition=1, le="0.025") == 1
    assert value(samples, bucket, partition=1, le="0.05") == 3
    assert value(samples, bucket, partition=1, le="2.5") == 4
    assert value(samples, bucket, partition=1, le="300.0") == 4
    assert value(samples, bucket, partition=1, le="+Inf") == 5
    assert value(samples, "ordered_tasks_task_duration_seconds_count", partition=1) == 5
    assert value(samples, "ordered_tasks_task_duration_seconds_sum", partition=1) == pytest.approx(402.065)
    assert value(samples, "ordered_tasks_task_duration_seconds_count", partition=2) is None  # nothing ran


def _count_many(times: int) -> None:
    for _ in range(times):
        metrics.count(4, metrics.SUCCEEDED)
        metrics.task_ran(4, 0.001)


def test_counts_made_in_forked_pool_processes_reach_the_main_process(counting: metrics.Tally) -> None:
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=_count_many, args=(2000,)) for _ in range(2)]
    for child in children:
        child.start()
    _count_many(2000)
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    row = counting.row(4)
    assert row[metrics.SUCCEEDED] == 6000  # not one count lost to a race: the lock is shared
    samples = scrape(metrics.Exporter([4]))
    assert value(samples, "ordered_tasks_task_duration_seconds_count", partition=4) == 6000


def test_without_metrics_nothing_is_counted() -> None:
    assert not metrics.TALLY.enabled
    metrics.count(1, metrics.SUCCEEDED)
    metrics.parked(1, "failed")
    metrics.task_ran(1, 1.0)
    metrics.partition_owned(1, True)
    assert metrics.TALLY.row(1) == (0.0,) * metrics.SLOTS
    assert metrics.OWNERSHIP.owned == {}


def test_ownership_is_a_gauge_per_served_partition_and_each_change_is_counted(
        counting: metrics.Tally) -> None:
    metrics.partition_owned(2, True)
    metrics.partition_owned(2, True)  # no change
    metrics.partition_owned(6, True)
    metrics.partition_owned(6, False)
    metrics.partition_owned(6, True)
    samples = scrape(metrics.Exporter([2, 4, 6]))
    assert [value(samples, "ordered_tasks_partition_owned", partition=p) for p in (2, 4, 6)] == [1, 0, 1]
    changes = "ordered_tasks_partition_ownership_changes_total"
    assert value(samples, changes, partition=2, change="gained") == 1
    assert value(samples, changes, partition=6, change="gained") == 2
    assert value(samples, changes, partition=6, change="lost") == 1
    metrics.connection_replaced()  # RabbitMQ: a new connection, ours again once a message arrives
    samples = scrape(metrics.Exporter([2, 4, 6]))
    assert [value(samples, "ordered_tasks_partition_owned", partition=p) for p in (2, 4, 6)] == [0, 0, 0]
    assert value(samples, changes, partition=2, change="lost") == 1
    assert value(samples, changes, partition=6, change="lost") == 2


class _Message:
    def __init__(self, queue: str) -> None:
        self.delivery_info = {"routing_key": queue}


class _QoS:
    def __init__(self) -> None:
        from ordered_tasks.conf import get_settings

        prefix = get_settings().queue_prefix
        self._delivered = {"tag-1": _Message(f"{prefix}.5")}
        self._placed = {"tag-2": f"{prefix}.6"}


def test_a_failed_acknowledgement_is_counted_under_the_partition_of_its_message(
        counting: metrics.Tally) -> None:
    qos = _QoS()
    channel = type("Channel", (), {"qos": qos})()
    metrics.acknowledgement_failed(qos, "tag-1", metrics.ACK_CONNECTION_CLOSED)
    metrics.acknowledgement_failed(channel, "tag-1", metrics.ACK_REDIS_ERROR)
    metrics.acknowledgement_failed(channel, "tag-2", metrics.ACK_REDIS_ERROR)  # known by the window only
    metrics.acknowledgement_failed(channel, "unknown", metrics.ACK_REDIS_ERROR)
    samples = scrape(metrics.Exporter([5, 6]))
    name = "ordered_tasks_acknowledgements_failed_total"
    assert value(samples, name, partition=5, cause="connection_closed") == 1
    assert value(samples, name, partition=5, cause="redis_error") == 1
    assert value(samples, name, partition=6, cause="redis_error") == 1
    assert total(samples, name) == 3


class _ClosedQoS(_QoS):
    """A QoS whose channel lost its connection."""

    channel = type("Channel", (), {"connection": None})()


class _FailingChannel:
    """A Redis channel whose acknowledgements Redis refuses."""

    _unsent: list[str] | None = None
    qos = _QoS()

    def _send_forget(self, delivery_tag: str) -> None:
        raise redis.ConnectionError("Redis went away")


def test_the_transport_counts_acknowledgements_that_did_not_reach_the_broker(counting: metrics.Tally) -> None:
    from ordered_tasks.worker.transport.fetch import ReliableChannel
    from ordered_tasks.worker.transport.qos import HeadQoS

    assert HeadQoS._closed(_ClosedQoS(), "acknowledge", "tag-1") is True  # type: ignore[arg-type]
    channel = _FailingChannel()
    assert ReliableChannel.forget(channel, "tag-2") is False  # type: ignore[arg-type]
    assert channel._unsent == ["tag-2"]
    row5, row6 = counting.row(5), counting.row(6)
    assert (row5[metrics.ACK_CONNECTION_CLOSED], row5[metrics.ACK_REDIS_ERROR]) == (1, 0)
    assert (row6[metrics.ACK_CONNECTION_CLOSED], row6[metrics.ACK_REDIS_ERROR]) == (0, 1)


@pytest.mark.django_db
def test_a_stale_fencing_token_is_counted_as_a_rejection(counting: metrics.Tally) -> None:
    from ordered_tasks.exceptions import StaleOwnerError
    from ordered_tasks.worker.failures.store import check_fence

    check_fence(3, 7)
    check_fence(3, 7)  # the same owner again: accepted
    assert counting.row(3)[metrics.FENCE_REFUSED] == 0
    with pytest.raises(StaleOwnerError):
        check_fence(3, 6)
    assert counting.row(3)[metrics.FENCE_REFUSED] == 1
    assert counting.row(3)[metrics.LEASE_REFUSED] == 0


def test_each_reason_a_message_is_parked_for_has_its_own_series(counting: metrics.Tally) -> None:
    reasons = list(ParkedMessage.Reason.values)
    assert len(reasons) <= metrics.MAX_REASONS
    for count, reason in enumerate(reasons, start=1):
        metrics.parked(2, reason, count)
    metrics.parked(2, "not a reason")
    samples = scrape(metrics.Exporter([2]))
    name = "ordered_tasks_messages_parked_total"
    assert {reason: value(samples, name, partition=2, reason=reason) for reason in reasons} == {
        reason: count for count, reason in enumerate(reasons, start=1)}
    assert total(samples, name) == len(reasons) * (len(reasons) + 1) / 2


@pytest.mark.skipif(tuple(int(p) for p in celery.__version__.split(".")[:2]) < (5, 7),
                    reason="runs the worker code through the testing helper, which needs Celery 5.7")
@pytest.mark.django_db(transaction=True)
def test_the_worker_code_counts_outcomes_where_they_happen(counting: metrics.Tally) -> None:
    """Successes also of retried and replayed messages, which a pool process runs inside a control task."""
    from ordered_tasks.testing import OrderedTasksRunner
    from tests.testapp import testing_tasks
    from tests.testapp.testing_tasks import BROKEN, OUTAGES, apply_event, push_to_crm

    testing_tasks.reset()
    try:
        blocked, flaky, skipped = 101, 202, 303
        BROKEN.update({(blocked, 2), (skipped, 1)})
        OUTAGES[flaky] = 1
        with OrderedTasksRunner() as runner:
            for seq in (1, 2, 3):
                apply_event.delay(account_id=blocked, seq=seq)
            push_to_crm.delay(account_id=flaky, seq=1)
            apply_event.delay(account_id=skipped, seq=1)
            apply_event.delay(account_id=skipped, seq=2)
            runner.run()
            BROKEN.clear()
            runner.replay(blocked)
            runner.skip(skipped)
            runner.run()
        assert AccountState.objects.get(key=str(blocked)).status == "active"
    finally:
        testing_tasks.reset()
    part = {key: partition_for(key) for key in (blocked, flaky, skipped)}
    expected: dict[int, Counter[str]] = {p: Counter() for p in part.values()}
    # blocked: 1 ok, 2 fails and blocks, 3 parked behind it; the replay runs 2 and 3.
    expected[part[blocked]].update(succeeded=3, failed=1, parked_failed=1, parked_key_held=1, replays=1, runs=4)
    # flaky: fails once, retried in place, then succeeds in the wake-up's drain.
    expected[part[flaky]].update(succeeded=1, retried=1, parked_retrying=1, runs=2)
    # skipped: 1 fails and blocks, 2 parked; the skip sets 1 aside and runs 2.
    expected[part[skipped]].update(succeeded=1, failed=1, parked_failed=1, parked_key_held=1, skips=1,
                                   runs=2)
    for partition, want in expected.items():
        row = counting.row(partition)
        found = Counter({
            "succeeded": row[metrics.SUCCEEDED], "failed": row[metrics.FAILED], "retried": row[metrics.RETRIED],
            "replays": row[metrics.REPLAYS], "skips": row[metrics.SKIPS],
            "runs": row[metrics._DURATION_COUNT],
            **{f"parked_{reason}": row[slot] for reason, slot in counting.reasons.items()},
        })
        assert +found == +want, f"partition {partition}"


@pytest.mark.django_db
def test_key_states_and_parked_messages_are_read_from_the_database(counting: metrics.Tally) -> None:
    now = timezone.now()
    AccountState.objects.create(key="b1", partition=1, status="blocked", blocked_at=now - timedelta(minutes=20))
    AccountState.objects.create(key="b2", partition=1, status="blocked", blocked_at=now - timedelta(minutes=2))
    AccountState.objects.create(key="r1", partition=1, status="retrying")
    AccountState.objects.create(key="r2", partition=2, status="retrying")
    AccountState.objects.create(key="a1", partition=2, status="active")
    AccountState.objects.create(key="far", partition=7, status="blocked", blocked_at=now)  # not served
    for position, (key, partition, state) in enumerate([
            ("b1", 1, "parked"), ("b1", 1, "parked"), ("r2", 2, "parked"), ("a1", 2, "failed"),
            ("far", 7, "parked")]):
        ParkedMessage.objects.create(key=key, partition=partition, position=position, state=state,
                                     reason="failed", body=b"")
    exporter = metrics.Exporter([1, 2, 3])
    exporter.refresh()  # no broker URL: the database only
    samples = scrape(exporter)
    assert value(samples, "ordered_tasks_database_up") == 1
    assert [value(samples, "ordered_tasks_keys_blocked", partition=p) for p in (1, 2, 3)] == [2, 0, 0]
    assert [value(samples, "ordered_tasks_keys_retrying", partition=p) for p in (1, 2, 3)] == [1, 1, 0]
    assert [value(samples, "ordered_tasks_parked_messages", partition=p) for p in (1, 2, 3)] == [2, 1, 0]
    age = value(samples, "ordered_tasks_blocked_key_max_age_seconds", partition=1)
    assert age is not None and 20 * 60 <= age < 21 * 60
    assert value(samples, "ordered_tasks_blocked_key_max_age_seconds", partition=2) is None
    assert value(samples, "ordered_tasks_keys_blocked", partition=7) is None


def test_a_scrape_reads_memory_only_and_an_unreachable_broker_or_database_is_reported(
        counting: metrics.Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db.utils import OperationalError

    def broken(*_: Any) -> None:
        raise OperationalError("the database went away")

    monkeypatch.setattr(metrics, "read_key_states", broken)
    exporter = metrics.Exporter([0, 1], broker_url="redis://127.0.0.1:1/0")
    exporter.readings.depth = {0: 5}
    started = time.monotonic()
    exporter.refresh()
    assert time.monotonic() - started < 10  # the broker's own timeout, not a hang
    started = time.monotonic()
    samples = scrape(exporter)
    assert time.monotonic() - started < 1.0
    assert value(samples, "ordered_tasks_broker_up") == 0
    assert value(samples, "ordered_tasks_database_up") == 0
    assert value(samples, "ordered_tasks_queue_messages", partition=0) is None  # not a stale 5
    assert value(samples, "ordered_tasks_keys_blocked", partition=0) is None
    assert value(samples, "ordered_tasks_partition_owned", partition=1) == 0


def test_gauges_from_the_worker_figures(counting: metrics.Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = PartitionFigures(progress_at=1_700_000_000.0, last_wait=2.5)
    figures.running = {"t1": object(), "t2": object()}  # type: ignore[dict-item]
    monkeypatch.setitem(FIGURES.partitions, 6, figures)
    samples = scrape(metrics.Exporter([6, 7]))
    assert value(samples, "ordered_tasks_tasks_running", partition=6) == 2
    assert value(samples, "ordered_tasks_tasks_running", partition=7) == 0
    assert value(samples, "ordered_tasks_last_progress_timestamp_seconds", partition=6) == 1_700_000_000.0
    assert value(samples, "ordered_tasks_last_progress_timestamp_seconds", partition=7) is None
    assert value(samples, "ordered_tasks_last_wait_seconds", partition=6) == 2.5
    assert value(samples, "ordered_tasks_partitions") == 8


@pytest.mark.integration
def test_queue_depths_and_head_ages_come_from_the_broker(counting: metrics.Tally, app: Celery,
                                                         broker: str) -> None:
    key = f"acct-{uuid.uuid4().hex[:8]}"
    partition = partition_for(key)
    publish(app, "strict_step", uuid.uuid4().hex, (key, 1), (key, 2))
    other = (partition + 1) % 8
    exporter = metrics.Exporter([partition, other], broker_url=broker)

    def read() -> Samples | None:  # RabbitMQ counts a publish a moment after it was sent
        exporter.refresh()
        samples = scrape(exporter)
        return samples if value(samples, "ordered_tasks_queue_messages", partition=partition) == 2 else None

    samples = eventually(read, timeout=10, what="the broker to count both messages")
    assert value(samples, "ordered_tasks_broker_up") == 1
    assert value(samples, "ordered_tasks_queue_messages", partition=other) == 0
    assert value(samples, "ordered_tasks_queue_messages", partition=(partition + 2) % 8) is None  # not served
    age = value(samples, "ordered_tasks_queue_oldest_message_age_seconds", partition=partition)
    if broker.startswith("redis"):
        assert age is not None and 0 <= age < 60
        assert value(samples, "ordered_tasks_queue_oldest_message_age_seconds", partition=other) == 0
    else:  # RabbitMQ cannot show the head of a queue without taking it
        assert age is None
        assert value(samples, "ordered_tasks_queue_oldest_message_age_seconds", partition=other) is None


def test_every_name_the_exporter_shows_is_declared(counting: metrics.Tally,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for slot in range(metrics.SLOTS):
        counting.add(0, (slot, 1.0))
    monkeypatch.setitem(FIGURES.partitions, 0, PartitionFigures(progress_at=1.0, last_wait=1.0))
    metrics.partition_owned(0, True)
    exporter = metrics.Exporter([0])
    exporter.readings = metrics.Readings(database_up=True, blocked={0: 1}, blocked_since={0: time.time()},
                                         broker_up=True, depth={0: 1}, oldest_age={0: 1.0})
    assert names_in(scrape(exporter)) == metrics.METRIC_NAMES


# The setting and the command -----------------------------------------------------------------------

def test_each_worker_process_gets_the_metrics_port_plus_its_index(settings: Any, client: Any) -> None:
    settings.ORDERED_TASKS = {**settings.ORDERED_TASKS, "PARTITIONS": 6, "METRICS_PORT": 9300}
    options = {"celery_args": [], "partitions": None, "processes": 3, "hostname": "o@%h", "pool": "threads",
               "app": None}
    children = Command().plan(options)
    assert [c.argv[c.argv.index("--metrics-port") + 1] for c in children] == ["9300", "9301", "9302"]
    assert all(c.argv.index("--metrics-port") < c.argv.index("--") for c in children)
    override = Command().plan({**options, "metrics_port": 9400})
    assert [c.argv[c.argv.index("--metrics-port") + 1] for c in override] == ["9400", "9401", "9402"]
    settings.ORDERED_TASKS = {**settings.ORDERED_TASKS, "METRICS_PORT": None}
    assert all("--metrics-port" not in c.argv for c in Command().plan(options))
    with pytest.raises(ConfigurationError, match="ports 65534 to 65536"):
        Command().plan({**options, "metrics_port": 65534})
    with pytest.raises(ConfigurationError, match="Metrics port 0"):
        Command().plan({**options, "metrics_port": 0})


def test_without_prometheus_client_asking_for_metrics_says_what_to_install(
        settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if not installed
    with pytest.raises(ConfigurationError, match=re.escape('pip install "django-ordered-tasks[metrics]"')):
        metrics.require_client()
    with pytest.raises(CommandError, match=r"prometheus_client is not installed.*\[metrics\]"):
        call_command("ordered_worker", "--metrics-port", "9300", "--processes", "1")
    settings.ORDERED_TASKS = {**settings.ORDERED_TASKS, "METRICS_PORT": None}
    assert len(Command().plan({"celery_args": [], "partitions": None, "processes": 2, "hostname": "o@%h",
                               "pool": "threads", "app": None})) == 2  # no metrics asked: runs as before


# The dashboard and the alert rules ---------------------------------------------------------------

def _names(expression: str) -> set[str]:
    return set(re.findall(r"\bordered_tasks_[a-z0-9_]+", expression))


def _rules() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_dashboard_parses_and_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    expressions += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = set().union(*map(_names, expressions))
    assert used - metrics.METRIC_NAMES == set()
    wanted = {"ordered_tasks_tasks_succeeded_total", "ordered_tasks_tasks_failed_total",
              "ordered_tasks_parked_messages", "ordered_tasks_keys_blocked", "ordered_tasks_keys_retrying",
              "ordered_tasks_queue_messages", "ordered_tasks_queue_oldest_message_age_seconds",
              "ordered_tasks_partition_owned", "ordered_tasks_task_duration_seconds_bucket"}
    assert wanted <= used
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_alert_rules_parse_and_use_only_exported_metrics() -> None:
    rules = _rules()
    used = set().union(*(_names(rule["expr"]) for rule in rules))
    assert used - metrics.METRIC_NAMES == set()
    assert {"OrderedTasksKeyBlocked", "OrderedTasksOldestMessageTooOld", "OrderedTasksPartitionStalled",
            "OrderedTasksPartitionWithoutOwner"} <= {rule["alert"] for rule in rules}
    assert all(rule["annotations"]["summary"] for rule in rules)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) is not installed")
def test_the_alert_rules_fire_as_their_unit_tests_say() -> None:
    result = subprocess.run(["promtool", "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True,
                            cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


# A real worker -----------------------------------------------------------------------------------

def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive TCP ports that nothing listens on."""
    for _ in range(100):
        base = random.randint(20000, 40000)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise AssertionError("no free ports")


def _scrape_port(port: int) -> Samples | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return parse(response.read().decode())
    except OSError:
        return None


@pytest.mark.e2e
@pytest.mark.slow
def test_each_worker_process_serves_its_partitions_metrics(
        app: Celery, broker: str, start_workers: Any, results: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, client: Any) -> None:
    run = uuid.uuid4().hex
    port = _free_ports(2)
    monkeypatch.setenv("TEST_METRICS_PORT", str(port))
    bad, good = same_partition_keys(2)
    flaky = f"flaky-{uuid.uuid4().hex[:8]}"
    fail(results, run, bad, 1)  # always: blocks its key
    fail(results, run, flaky, 1, times=1)  # once: retried in place
    start_workers(2)
    publish(app, "strict_step", run, (good, 1), (bad, 1), (good, 2), (bad, 2), (good, 3))
    publish(app, "autoretry_step", run, (flaky, 1))
    assert wait_done(results, run, 4) == 4
    eventually(lambda: len(parked(bad)) == 2, what="the failed message and the one behind it parked")
    dealt = {0: {0, 2, 4, 6}, 1: {1, 3, 5, 7}}  # round-robin over the two worker processes

    def both() -> list[Samples] | None:
        scraped = [_scrape_port(port), _scrape_port(port + 1)]
        if scraped[0] is None or scraped[1] is None:
            return None
        owner = scraped[partition_for(bad) % 2]
        if value(owner, "ordered_tasks_parked_messages", partition=partition_for(bad)) != 2:
            return None  # the database is read every 10 seconds
        runs = sum(total(s, "ordered_tasks_task_duration_seconds_count") for s in scraped)
        succeeded = sum(total(s, "ordered_tasks_tasks_succeeded_total") for s in scraped)
        # A run is counted once it returned, a moment after the task recorded itself.
        return [scraped[0], scraped[1]] if runs >= 6 and succeeded >= 4 else None

    scraped = eventually(both, timeout=60, what="both endpoints, the parked messages read from the database")
    for index, samples in enumerate(scraped):
        owned = {labels[0][1] for (name, labels) in samples if name == "ordered_tasks_partition_owned"}
        assert owned == {str(p) for p in dealt[index]}, f"worker {index} reports other partitions"
        assert {k for (n, labels) in samples if n.startswith("ordered_tasks_") for k, _ in labels} <= LABELS
        assert value(samples, "ordered_tasks_database_up") == 1
        assert value(samples, "ordered_tasks_broker_up") == 1
        assert value(samples, "ordered_tasks_partitions") == 8
        assert {labels[0][1] for (name, labels) in samples if name == "ordered_tasks_queue_messages"} == {
            str(p) for p in dealt[index]}
    merged: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
    for samples in scraped:
        merged.update(samples)
    p_bad, p_flaky = partition_for(bad), partition_for(flaky)
    succeeded = Counter({p_bad: 3})
    succeeded[p_flaky] += 1  # after its retry, in the wake-up's drain
    for partition in range(8):
        assert total(merged, "ordered_tasks_tasks_succeeded_total", partition=partition) == succeeded[partition]
    assert total(merged, "ordered_tasks_tasks_failed_total") == 1
    assert total(merged, "ordered_tasks_tasks_failed_total", partition=p_bad) == 1
    assert total(merged, "ordered_tasks_tasks_retried_total", partition=p_flaky) == 1
    parked_total = "ordered_tasks_messages_parked_total"
    assert total(merged, parked_total, partition=p_bad, reason="failed") == 1
    assert total(merged, parked_total, partition=p_bad, reason="key_held") == 1
    assert total(merged, parked_total, partition=p_flaky, reason="retrying") == 1
    assert total(merged, "ordered_tasks_task_duration_seconds_count") == 6  # 3 good, 1 bad, 2 flaky
    owner = scraped[p_bad % 2]
    assert value(owner, "ordered_tasks_partition_owned", partition=p_bad) == 1
    assert value(owner, "ordered_tasks_keys_blocked", partition=p_bad) == 1
    assert value(owner, "ordered_tasks_parked_messages", partition=p_bad) == 2
    assert (value(owner, "ordered_tasks_blocked_key_max_age_seconds", partition=p_bad) or -1) >= 0
    gained = total(merged, "ordered_tasks_partition_ownership_changes_total", change="gained")
    assert gained >= len({p_bad, p_flaky})  # Redis: every partition; RabbitMQ: those with messages
    progress = value(owner, "ordered_tasks_last_progress_timestamp_seconds", partition=p_bad)
    assert progress is not None and abs(time.time() - progress) < 120
