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
from tests.conftest import Workers, children, eventually, unacknowledged_queues, wait_done
from tests.support.workload import assert_in_order, assert_keys_never_overlap, publish_interleaved

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def worker_processes(workers: Workers) -> list[int]:
    """Celery worker main processes and their pool processes (not the supervisor)."""
    mains = workers.child_pids()
    pool = []
    for pid in mains:
        pool.extend(children(pid))
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
    assert_keys_never_overlap(results, run)
    assert done - total <= kills


def test_a_standby_takes_over_when_the_owner_stops_and_never_overlaps(
        app: Celery, start_workers: Any, results: redis.Redis) -> None:
    run = uuid.uuid4().hex
    owner = start_workers(1)
    standby = start_workers(1)
    total = publish_interleaved(app, run, keys=30, per_key=20, seed=5, slow=0.02)
    while int(results.get(f"{run}:done") or 0) < total // 4:
        time.sleep(0.05)
    owner.terminate()  # warm shutdown while tasks are running
    assert wait_done(results, run, total, timeout=90) >= total
    assert owner.process.wait(60) == 0
    assert_in_order(results, run, keys=30, per_key=20, redelivered=1)
    assert_keys_never_overlap(results, run)
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


def test_a_standby_wakes_a_key_the_killed_owner_held_without_a_wake_up(
        app: Celery, start_workers: Any, results: redis.Redis) -> None:
    """The owner parked a crowded key's messages and was killed before it published the wake-up."""
    import json

    from ordered_tasks.worker.delivery import Delivery
    from ordered_tasks.worker.failures import store

    run, key = uuid.uuid4().hex, f"held-{uuid.uuid4().hex[:8]}"
    partition = partition_for(key)
    owner = start_workers(1)
    start_workers(1)  # the standby
    name = "tests.testapp.tasks.ordered_record"
    parked = [Delivery(key=key, partition=partition, task_name=name, task_id=str(uuid.uuid4()),
                       body=json.dumps([[], {"run": run, "key": key, "seq": seq}, {}]).encode(),
                       content_type="application/json", content_encoding="utf-8",
                       headers={"task": name, "ordered_key": key, "ordered_partition": partition})
              for seq in (1, 2, 3)]
    store.spill(key, partition, parked)  # held, and no wake-up on its way
    for main in owner.child_pids():
        subprocess.run(["kill", "-KILL", str(main)], check=False)
    owner.process.send_signal(signal.SIGKILL)
    app.tasks[name].apply_async(kwargs={"run": run, "key": key, "seq": 4})  # the next event of the key
    eventually(lambda: recorded(results, run, key) == [1, 2, 3, 4], timeout=60,
               what="the standby to wake the key and run its parked messages, then the new one")


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
    task.delay(run=run, key=slow, seq=1, sleep=5.0)
    # Frozen while it runs the slow one: a message it had not started yet it would refuse on thawing.
    # The held one is published only then: the fetch takes partitions in turn, not in publish order.
    eventually(lambda: results.llen(f"{run}:started:{slow}"), timeout=15, what="the owner to start the slow one")
    task.delay(run=run, key=held, seq=1)  # waits in the owner, behind the slow one
    with app.connection_for_write() as conn:
        ours = {partition_queue(get_settings().queue_prefix, partition_for(k)).name for k in (slow, held)}
        eventually(lambda: ours <= set(unacknowledged_queues(conn.default_channel)), timeout=4,
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


def keys_of_partition(partition: int, count: int) -> list[str]:
    """``count`` keys that hash onto ``partition``."""
    found = (f"p{partition}-{i}" for i in range(100_000))
    return [key for key in found if partition_for(key) == partition][:count]


@pytest.mark.integration
@pytest.mark.slow
def test_a_warm_shutdown_hands_over_to_the_standby_while_publishing_and_loses_nothing(
        app: Celery, broker: str, start_workers: Any, results: redis.Redis) -> None:
    """The owner's consumers end with its connection, never with a cancel.

    A cancel of the active consumer of a single-active-consumer queue promotes
    the standby while the owner still holds a message of the partition. On
    RabbitMQ 3.10 a message published while the cancel is under way can also
    crash the queue (``{badmatch,false}`` as it delivers): the queue loses the
    messages it held and those published until it restarts, and the owner's
    shutdown waits on its cancel until then. The owner cancels its queues one
    after the other, partition 0 first, so partition 0 gets every message,
    before and throughout the owner's shutdown.
    """
    if not broker.startswith("amqp"):
        pytest.skip("single active consumer is RabbitMQ's; Redis hands over with leases")
    from ordered_tasks.models import ParkedMessage

    run = uuid.uuid4().hex
    keys = keys_of_partition(0, 10)
    task = app.tasks["tests.testapp.tasks.ordered_record"]
    owner = start_workers(1)
    start_workers(1)  # the standby
    seq = 0
    stopping_since = None
    with app.producer_or_acquire() as producer:
        # More than the owner drains: messages wait in the queue when it stops, and
        # keep arriving until its connection is closed (or for 10 s).
        while owner.process.poll() is None and (
                stopping_since is None or time.monotonic() < stopping_since + 10):
            seq += 1
            for key in keys:
                task.apply_async(kwargs={"run": run, "key": key, "seq": seq}, producer=producer)
            if seq == 150:
                owner.terminate()
                stopping_since = time.monotonic()
            elif stopping_since is not None:
                time.sleep(0.02)  # about 500 a second: the standby drains them in seconds, not a minute
    try:
        owner.process.wait(30)  # a few seconds alone; the old code's cancel hung for minutes
    except subprocess.TimeoutExpired:
        for pid in worker_processes(owner):  # stuck in its shutdown: leave nothing behind
            subprocess.run(["kill", "-KILL", str(pid)], check=False)
        owner.process.kill()
        pytest.fail("the owner's warm shutdown did not end within 30 s of the last publish")
    assert owner.process.returncode == 0
    total = seq * len(keys)
    wait_done(results, run, total, timeout=60)
    ran = {key: [int(s) for s in results.lrange(f"{run}:key:{key}", 0, -1)] for key in keys}
    missing = {key: sorted(set(range(1, seq + 1)) - set(seqs)) for key, seqs in ran.items()}
    lost = sum(len(m) for m in missing.values())
    assert not lost, f"{lost} of {total} messages never ran: {missing}"
    assert not ParkedMessage.objects.exists()
    for key, seqs in ran.items():
        collapsed = [s for i, s in enumerate(seqs) if i == 0 or s != seqs[i - 1]]
        assert collapsed == list(range(1, seq + 1)), f"key {key} ran out of order: {seqs}"
    assert_keys_never_overlap(results, run)


@pytest.mark.integration
@pytest.mark.slow
def test_three_launchers_a_killed_standby_and_a_warm_stop_under_steady_publishing_lose_nothing(
        app: Celery, broker: str, start_workers: Any, results: redis.Redis) -> None:
    """The scenario that once lost messages around a takeover on RabbitMQ, scaled down in time.

    Three launchers for the same partitions (a, then b, then c a few seconds
    apart), a producer publishing about 100 tasks/s over 300 keys (5 ms
    tasks) throughout; every process of b is killed, then a stops warm. c
    takes over what a held. Nothing may be lost or run out of its key's order.
    """
    if not broker.startswith("amqp"):
        pytest.skip("single active consumer is RabbitMQ's; Redis hands over with leases "
                    "(the nemesis kills and stops launchers on both brokers)")
    from ordered_tasks.models import ParkedMessage

    run = uuid.uuid4().hex
    keys = [f"acct-{n}" for n in range(300)]
    task = app.tasks["tests.testapp.tasks.ordered_record"]
    a = start_workers(2)
    sent = dict.fromkeys(keys, 0)
    rng = random.Random(14)
    started = time.monotonic()
    b = c = None
    b_killed = a_stopped = False
    with app.producer_or_acquire() as producer:
        while time.monotonic() - started < 20:
            elapsed = time.monotonic() - started
            if b is None and elapsed > 3:
                b = start_workers(2, ready=False)
            if c is None and elapsed > 6:
                c = start_workers(2, ready=False)
            if b is not None and not b_killed and elapsed > 9:  # b and all its processes
                for pid in [*worker_processes(b), b.process.pid]:
                    subprocess.run(["kill", "-KILL", str(pid)], check=False)
                b_killed = True
            if not a_stopped and elapsed > 13:  # a warm stop: c takes over
                a.terminate()
                a_stopped = True
            key = rng.choice(keys)
            sent[key] += 1
            task.apply_async(kwargs={"run": run, "key": key, "seq": sent[key], "sleep": 0.005},
                             producer=producer)
            time.sleep(0.01)
    assert a.process.wait(60) == 0
    total = sum(sent.values())
    done = wait_done(results, run, total, timeout=120)
    ran = {key: [int(s) for s in results.lrange(f"{run}:key:{key}", 0, -1)] for key in keys}
    missing = {key: sorted(set(range(1, n + 1)) - set(ran[key])) for key, n in sent.items()
               if set(range(1, n + 1)) - set(ran[key])}
    assert not missing, f"{sum(map(len, missing.values()))} of {total} messages never ran ({done} done): {missing}"
    assert not ParkedMessage.objects.exists()
    for key, seqs in ran.items():
        collapsed = [s for i, s in enumerate(seqs) if i == 0 or s != seqs[i - 1]]
        assert collapsed == list(range(1, sent[key] + 1)), f"key {key} ran out of order: {seqs}"
    assert_keys_never_overlap(results, run)
