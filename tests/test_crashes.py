"""Crash safety against real brokers: SIGKILL chaos, standby takeover, two launchers at once."""

from __future__ import annotations

import os
import random
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
from ordered_tasks.queues import partition_queue
from tests.conftest import Workers, eventually, unacknowledged_queues, wait_done
from tests.test_workers import assert_in_order, assert_partitions_never_overlap, publish_interleaved

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def worker_processes(workers: Workers) -> list[int]:
    """Celery worker main processes and their pool processes (not the supervisor)."""
    mains = workers.child_pids()
    pool = []
    for pid in mains:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
        pool.extend(int(p) for p in out.stdout.split())
    return mains + pool


def lease_holders(app: Celery) -> dict[str, Any]:
    """Who holds which partition lease, with the time left (Redis brokers)."""
    from django.conf import settings

    client = redis.Redis.from_url(settings.ORDERED_TASKS["REDIS_URL"], decode_responses=True)
    return {key: (client.get(key), client.pttl(key)) for key in client.keys("ordered_tasks:lease:*")}


def test_sigkill_chaos_loses_nothing_and_keeps_order(app: Celery, start_workers: Any,
                                                     results: redis.Redis) -> None:
    run = uuid.uuid4().hex
    rng = random.Random(7)
    primary = start_workers(2)
    standby = start_workers(2)
    keys, per_key = 200, 10
    total = publish_interleaved(app, run, keys=keys, per_key=per_key, seed=11, slow=0.01)
    kills = 0
    deadline = time.monotonic() + 150
    while int(results.get(f"{run}:done") or 0) < total and kills < 8:
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(rng.uniform(0.5, 2.0))
        victims = worker_processes(rng.choice([primary, standby]))
        if victims:
            try:
                subprocess.run(["kill", "-KILL", str(rng.choice(victims))], check=False)
                kills += 1
            except OSError:
                pass
    done = wait_done(results, run, total, timeout=150)
    assert done >= total, f"only {done} of {total} tasks ran after {kills} kills"
    assert_in_order(results, run, keys=keys, per_key=per_key, redelivered=kills)
    assert_partitions_never_overlap(results, run)
    assert done - total <= kills


def test_a_standby_takes_over_when_the_owner_stops_and_never_overlaps(
        app: Celery, start_workers: Any, results: redis.Redis) -> None:
    run = uuid.uuid4().hex
    owner = start_workers(1)
    standby = start_workers(1)
    total = publish_interleaved(app, run, keys=30, per_key=20, seed=5, slow=0.02)
    while int(results.get(f"{run}:done") or 0) < total // 4:
        time.sleep(0.05)
    owner.process.send_signal(signal.SIGTERM)  # warm shutdown while tasks are running
    assert wait_done(results, run, total, timeout=90) >= total
    assert owner.process.wait(60) == 0
    assert_in_order(results, run, keys=30, per_key=20, redelivered=1)
    assert_partitions_never_overlap(results, run)
    pids = {entry.rsplit("|", 1)[1] for entry in results.lrange(f"{run}:spans", 0, -1)}
    assert len(pids) >= 2, "the standby never ran anything"
    del standby


def test_a_killed_owner_is_replaced_within_seconds(app: Celery, start_workers: Any,
                                                   results: redis.Redis) -> None:
    run = uuid.uuid4().hex
    owner = start_workers(1)
    start_workers(1)
    for main in owner.child_pids():
        subprocess.run(["kill", "-KILL", str(main)], check=False)
    owner.process.send_signal(signal.SIGKILL)  # the whole launcher is gone, not restarted
    started = time.monotonic()
    total = publish_interleaved(app, run, keys=10, per_key=5, seed=9)
    assert wait_done(results, run, total, timeout=60) >= total
    took = time.monotonic() - started
    assert took < 20, f"the standby took {took:.1f} s to take over; leases: {lease_holders(app)}"
    assert_in_order(results, run, keys=10, per_key=5)


def recorded(results: redis.Redis, run: str, key: str) -> list[int]:
    return [int(s) for s in results.lrange(f"{run}:key:{key}", 0, -1)]


def test_a_worker_frozen_past_its_lease_does_not_run_what_it_held_after_the_new_owner(
        app: Celery, broker: str, start_workers: Any, results: redis.Redis) -> None:
    if not broker.startswith("redis"):
        pytest.skip("leases are Redis's; RabbitMQ's single active consumer keeps a frozen one's messages")
    run = uuid.uuid4().hex
    slow, held = f"slow-{run[:6]}", f"held-{run[:6]}"
    while partition_for(held) == partition_for(slow):
        held += "x"
    owner = start_workers(1)
    start_workers(1)  # the standby
    task = app.tasks["tests.testapp.tasks.ordered_record"]
    task.delay(run=run, key=slow, seq=1, sleep=3.0)
    task.delay(run=run, key=held, seq=1)  # waits in the owner's pool pipe behind the slow one
    with app.connection_for_write() as conn:
        ours = {partition_queue(get_settings().queue_prefix, partition_for(k)).name for k in (slow, held)}
        eventually(lambda: ours <= set(unacknowledged_queues(conn.default_channel)), timeout=15,
                   what="the owner to hold both messages")
    frozen = worker_processes(owner)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        eventually(lambda: recorded(results, run, held) == [1], timeout=30, what="the standby to run the held one")
        task.delay(run=run, key=held, seq=2)
        eventually(lambda: recorded(results, run, held) == [1, 2], timeout=15, what="the standby to run the next")
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    eventually(lambda: len(recorded(results, run, slow)) == 2, timeout=15,
               what="the thawed owner to finish the task it was running")
    time.sleep(3.0)  # it would start the held message now
    assert recorded(results, run, held) == [1, 2]
