"""ordered_worker against real brokers: per-key order, supervision, clean shutdown."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
import uuid
from typing import Any

import pytest
import redis
from celery import Celery

from ordered_tasks import partition_for
from ordered_tasks.conf import get_settings
from ordered_tasks.models import ParkedMessage
from ordered_tasks.worker.sequencing.window import spill_at
from tests.conftest import queue_depths, unacknowledged_queues, wait_done
from tests.support.workload import (
    ORDERED,
    assert_in_order,
    assert_keys_never_overlap,
    publish_interleaved,
)

pytestmark = pytest.mark.e2e
def test_thousands_of_interleaved_tasks_keep_per_key_order(app: Celery, start_workers: Any,
                                                           results: redis.Redis) -> None:
    run = uuid.uuid4().hex
    start_workers(3)
    total = publish_interleaved(app, run, keys=300, per_key=10, slow=0.005)
    assert wait_done(results, run, total) == total
    assert_in_order(results, run, keys=300, per_key=10)
    assert_keys_never_overlap(results, run)
    pids = {entry.rsplit("|", 1)[1] for entry in results.lrange(f"{run}:spans", 0, -1)}
    assert len(pids) >= 3, "the work was not spread over the worker processes"


def test_backlog_published_before_workers_start(app: Celery, start_workers: Any,
                                                results: redis.Redis) -> None:
    run = uuid.uuid4().hex
    total = publish_interleaved(app, run, keys=50, per_key=20, seed=2)
    start_workers(2)
    assert wait_done(results, run, total) == total
    assert_in_order(results, run, keys=50, per_key=20)


def test_plain_tasks_are_not_consumed_by_ordered_workers(app: Celery, start_workers: Any,
                                                         results: redis.Redis) -> None:
    from django.conf import settings

    run = uuid.uuid4().hex
    start_workers(1)
    app.tasks["tests.testapp.tasks.plain_record"].delay(run, "k", 1)
    app.tasks[ORDERED].delay(run, "k", 1)
    assert wait_done(results, run, 1) == 1
    time.sleep(1.0)
    assert int(results.get(f"{run}:done")) == 1
    with app.connection_for_write() as conn:
        from kombu import Queue

        _, waiting, _ = Queue(settings.PLAIN_QUEUE)(conn.default_channel).queue_declare()
    assert waiting == 1


def test_supervisor_restarts_a_killed_worker(app: Celery, start_workers: Any, results: redis.Redis) -> None:
    workers = start_workers(2)
    victim = workers.child_pids()[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim in workers.child_pids() or len(workers.child_pids()) < 2:
        assert time.monotonic() < deadline, "the killed worker was not restarted"
        time.sleep(0.2)
    workers.wait_ready()
    run = uuid.uuid4().hex
    total = publish_interleaved(app, run, keys=40, per_key=5, seed=3)
    assert wait_done(results, run, total) == total
    assert_in_order(results, run, keys=40, per_key=5)


def test_sigterm_stops_cleanly_and_loses_nothing(app: Celery, start_workers: Any,
                                                 results: redis.Redis) -> None:
    run = uuid.uuid4().hex
    task = app.tasks[ORDERED]
    total = 0
    for seq in range(1, 41):
        for key in range(5):
            task.delay(run=run, key=f"k{key}", seq=seq, sleep=0.02)
            total += 1
    workers = start_workers(2)
    while int(results.get(f"{run}:done") or 0) < 20:
        time.sleep(0.02)
    assert workers.stop() == 0
    done = int(results.get(f"{run}:done") or 0)
    assert 0 < done < total
    # Waiting in the queues, or parked in the database: each key is hot in its partition, so its
    # waiting messages are spilled there, and run by its wake-up after the restart.
    waiting = sum(queue_depths(app).values()) + ParkedMessage.objects.filter(
        key__in=[f"k{key}" for key in range(5)], state="parked").count()
    # At-least-once: a message whose acknowledgement was still in flight at the stop may come back:
    # a task's (one per worker), or a spilled batch's (already parked: recognised, not run again).
    copies = 2 + 2 * spill_at(get_settings().window)
    assert total <= done + waiting <= total + copies, (
        f"a message was lost at shutdown: {done} done, queues {queue_depths(app)}, parked "
        f"{list(ParkedMessage.objects.values_list('key', 'reason'))}")
    start_workers(2)
    # A requeued copy of a task that had completed is recognised by the completion ledger and
    # not run again, so the count reaches at least every task, and repeats stay within two.
    assert wait_done(results, run, total) >= total
    assert_in_order(results, run, keys=5, per_key=40, redelivered=2)


def _unacknowledged(app: Celery) -> dict[str, int]:
    """Messages handed to a worker and not yet acknowledged, per partition queue of this session."""
    from ordered_tasks.conf import get_settings

    conf = get_settings()
    with app.connection_for_write() as conn:
        if conn.transport.driver_type == "redis":
            queues = unacknowledged_queues(conn.default_channel)
            counts = [(name, queues.count(name)) for name in set(queues)]
        else:
            if shutil.which("rabbitmqctl") is None:
                pytest.skip("rabbitmqctl is not available to count unacknowledged messages")
            out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "messages_unacknowledged",
                                  "--no-table-headers"], check=True, capture_output=True, text=True,
                                 timeout=60)
            counts = [(name, int(count)) for name, count in
                      (line.split("\t") for line in out.stdout.splitlines() if "\t" in line)]
    return {name: count for name, count in counts if count and conf.partition_of_queue(name) is not None}


@pytest.mark.parametrize("window", [1, 3])
def test_a_worker_holds_at_most_a_window_per_partition(app: Celery, start_workers: Any,
                                                       results: redis.Redis, window: int) -> None:
    """Other partitions' messages wait in the worker, never more than a window of one partition.

    With a window of 1 and one pool slot, a worker runs as the first version did.
    """
    from ordered_tasks.conf import get_settings
    from ordered_tasks.partitioning import queue_name

    run = uuid.uuid4().hex
    keys: dict[int, str] = {}
    for n in itertools.count():
        keys.setdefault(partition_for(f"w{n}"), f"w{n}")
        if len(keys) == 3:
            break
    slow, *others = keys.values()
    task = app.tasks[ORDERED]
    task.delay(run, slow, 1, sleep=4.0)
    for seq in range(1, 6):
        for key in others:
            task.delay(run, key, seq)
    for seq in range(2, 6):
        task.delay(run, slow, seq)
    workers = start_workers(1, window=window)
    queues = {queue_name(get_settings().queue_prefix, p) for p in keys}
    deadline = time.monotonic() + 3.0
    while True:  # while the slow task runs, the other partitions' next messages arrive
        held = _unacknowledged(app)
        assert all(count <= window for count in held.values()), held
        if queues <= set(held) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert queues <= set(held), held  # (an earlier test's leftovers may add other partitions)
    assert wait_done(results, run, 15) == 15
    for key in keys.values():
        assert [int(s) for s in results.lrange(f"{run}:key:{key}", 0, -1)] == [1, 2, 3, 4, 5]
    # The pool process gets its next message while it still runs one (not Celery's "fair").
    [stats] = (app.control.inspect(destination=workers.nodes, timeout=5).stats() or {}).values()
    assert stats["pool"]["max-concurrency"] == 1
    if stats["pool"]["implementation"].endswith("prefork:TaskPool"):
        assert stats["pool"]["writes"]["strategy"] == "fcfs"


def test_one_worker_with_several_pool_processes_keeps_order_and_runs_partitions_at_once(
        app: Celery, start_workers: Any, results: redis.Redis) -> None:
    run = uuid.uuid4().hex
    workers = start_workers(1, "--concurrency", "3")
    total = publish_interleaved(app, run, keys=200, per_key=10, slow=0.005)
    assert wait_done(results, run, total) == total
    assert_in_order(results, run, keys=200, per_key=10)
    assert_keys_never_overlap(results, run)
    spans = [entry.split("|") for entry in results.lrange(f"{run}:spans", 0, -1)]
    assert len({pid for *_, pid in spans}) == 3, "the work was not spread over the pool processes"
    overlapping = sum(1 for a, b in itertools.pairwise(sorted(spans, key=lambda s: float(s[2])))
                      if float(b[2]) < float(a[3]))
    assert overlapping > 0, "no two partitions ran at the same time"
    [stats] = (app.control.inspect(destination=workers.nodes, timeout=5).stats() or {}).values()
    assert stats["pool"]["max-concurrency"] == 3


def test_the_cancel_consumer_command_does_not_stop_a_partition(app: Celery, start_workers: Any,
                                                               results: redis.Redis) -> None:
    """``celery control cancel_consumer`` of a partition queue is refused: it would hand the partition over."""
    from ordered_tasks import queue_for

    workers = start_workers(1)
    run = uuid.uuid4().hex
    replies = app.control.cancel_consumer(queue_for("cancelled"), destination=workers.nodes, reply=True,
                                          timeout=5)
    assert replies, "the worker did not answer the remote control command"
    task = app.tasks[ORDERED]
    for seq in range(1, 6):
        task.delay(run=run, key="cancelled", seq=seq)
    assert wait_done(results, run, 5, timeout=30) == 5
    assert [int(s) for s in results.lrange(f"{run}:key:cancelled", 0, -1)] == [1, 2, 3, 4, 5]
