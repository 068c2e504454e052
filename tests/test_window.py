"""A partition's consumer runs many keys at once, each key one task at a time, with every pool."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import signal
import time
import uuid
from typing import Any

import pytest
import redis
from celery import Celery

from ordered_tasks.conf import get_settings
from tests.conftest import children, eventually, wait_done
from tests.support.workload import (
    ORDERED,
    T,
    assert_in_order,
    assert_keys_never_overlap,
    fail,
    overlaps_within_partitions,
    ran,
    same_partition_keys,
    status,
)

pytestmark = pytest.mark.e2e

POOLS = [
    pytest.param(("threads", 8), id="threads8"),
    pytest.param(("prefork", 3), id="prefork3"),
    pytest.param(("solo", 1), id="solo"),
    pytest.param(("gevent", 20), id="gevent20", marks=pytest.mark.skipif(
        importlib.util.find_spec("gevent") is None, reason="gevent is not installed")),
]


#: Messages of the hot key in the hot-key test.
HOT_MESSAGES = 120


def publish_keys(app: Celery, run: str, keys: list[str], per_key: int, sleep: float, seed: int = 3) -> int:
    """Publish ``per_key`` tasks of each key, randomly interleaved, each sleeping ``sleep`` seconds."""
    rng = random.Random(seed)
    sent = dict.fromkeys(keys, 0)
    task = app.tasks[ORDERED]
    with app.producer_or_acquire() as producer:
        while any(n < per_key for n in sent.values()):
            key = rng.choice([k for k, n in sent.items() if n < per_key])
            sent[key] += 1
            task.apply_async(kwargs={"run": run, "key": key, "seq": sent[key], "sleep": sleep},
                             producer=producer)
    return len(keys) * per_key


def assert_keys_in_order(results: redis.Redis, run: str, keys: list[str], per_key: int) -> None:
    for key in keys:
        assert ran(results, run, key) == list(range(1, per_key + 1)), key


@pytest.mark.parametrize("pool", POOLS)
def test_keys_of_one_partition_run_at_once_and_each_key_in_order(
        app: Celery, start_workers: Any, results: redis.Redis, pool: tuple[str, int]) -> None:
    name, concurrency = pool
    run = uuid.uuid4().hex
    start_workers(1, "--pool", name, "--concurrency", str(concurrency))
    total = publish_interleaved_sleeping(app, run, keys=40, per_key=8, sleep=0.02)
    assert wait_done(results, run, total, timeout=120) == total
    assert_in_order(results, run, keys=40, per_key=8)
    assert_keys_never_overlap(results, run)
    overlaps = overlaps_within_partitions(results, run)
    if concurrency > 1:
        assert overlaps > 0, "no two keys of a partition ran at the same time"
    else:
        assert overlaps == 0, "a pool of one ran two tasks at once"


def publish_interleaved_sleeping(app: Celery, run: str, keys: int, per_key: int, sleep: float) -> int:
    return publish_keys(app, run, [f"k{n}" for n in range(keys)], per_key, sleep)


def test_a_slow_task_holds_only_its_own_key(app: Celery, start_workers: Any, results: redis.Redis) -> None:
    """One partition, one key with a slow task: the other keys of the partition run past it."""
    run = uuid.uuid4().hex
    slow, *others = same_partition_keys(6)
    start_workers(1, "--pool", "threads", "--concurrency", "4")
    task = app.tasks[ORDERED]
    task.apply_async(kwargs={"run": run, "key": slow, "seq": 1, "sleep": 3.0})
    task.apply_async(kwargs={"run": run, "key": slow, "seq": 2, "sleep": 0.0})
    for key in others:
        for seq in (1, 2, 3):
            task.apply_async(kwargs={"run": run, "key": key, "seq": seq, "sleep": 0.0})
    eventually(lambda: all(ran(results, run, k) == [1, 2, 3] for k in others), timeout=30,
               what="the other keys of the partition")
    assert ran(results, run, slow) == [], "the slow key's tasks ended before its first one could"
    assert wait_done(results, run, 2 + 3 * len(others), timeout=30) == 2 + 3 * len(others)
    assert ran(results, run, slow) == [1, 2]


def test_a_retry_and_a_block_in_the_middle_of_a_window(
        app: Celery, start_workers: Any, results: redis.Redis) -> None:
    """Keys of one partition: one retries in place, one blocks; the others flow; each keeps its order."""
    from ordered_tasks.actions import replay

    run = uuid.uuid4().hex
    retrying, blocked, *others = same_partition_keys(8)
    fail(results, run, retrying, 2, times=2)  # retried in place after 1 s and 2 s
    fail(results, run, blocked, 2, times=1)  # blocks its key, parks the rest
    start_workers(1, "--pool", "threads", "--concurrency", "6")
    with app.producer_or_acquire() as producer:
        for seq in range(1, 6):
            for key in (retrying, *others):
                app.tasks[T + "autoretry_step"].apply_async(
                    kwargs={"run": run, "key": key, "seq": seq, "sleep": 0.05}, producer=producer)
            app.tasks[T + "strict_step"].apply_async(
                kwargs={"run": run, "key": blocked, "seq": seq}, producer=producer)
    eventually(lambda: all(ran(results, run, k) == [1, 2, 3, 4, 5] for k in others), timeout=30,
               what="the keys that did not fail")
    eventually(lambda: status(blocked) == "blocked" and ran(results, run, blocked) == [1], timeout=30,
               what="the blocked key")
    eventually(lambda: ran(results, run, retrying) == [1, 2, 3, 4, 5], timeout=40, what="the retried key")
    assert int(results.get(f"{run}:attempts:{retrying}:2") or 0) == 3
    replay(blocked, app=app)
    eventually(lambda: ran(results, run, blocked) == [1, 2, 3, 4, 5], timeout=30, what="the replayed key")
    # The drain activates the key once its last message ran and its row is deleted.
    eventually(lambda: status(blocked) == "active", timeout=10, what="the replayed key active")
    assert_keys_never_overlap(results, run)


#: The pool of the warm-shutdown and SIGKILL tests, by broker: each broker sees both pools
#: across the two tests (the nemesis draws every pool on both brokers).
SHUTDOWN_POOL = {"amqp": ("threads", 8), "redis": ("prefork", 3)}
KILL_POOL = {"amqp": ("prefork", 3), "redis": ("threads", 8)}


def test_a_warm_shutdown_with_a_full_window_loses_nothing_and_runs_nothing_twice(
        app: Celery, broker: str, start_workers: Any, results: redis.Redis) -> None:
    name, concurrency = SHUTDOWN_POOL["redis" if broker.startswith("redis") else "amqp"]
    run = uuid.uuid4().hex
    keys = [f"w{n}" for n in range(30)]
    first = start_workers(1, "--pool", name, "--concurrency", str(concurrency))
    total = publish_keys(app, run, keys, per_key=6, sleep=0.1)
    eventually(lambda: int(results.get(f"{run}:done") or 0) >= 20, timeout=60, what="a first share")
    first.terminate()  # warm: running tasks finish, the rest goes back
    assert first.process.wait(60) == 0
    done_at_stop = int(results.get(f"{run}:done") or 0)
    assert done_at_stop < total, "everything ran before the stop: the test proves nothing"
    start_workers(1, "--pool", name, "--concurrency", str(concurrency))
    assert wait_done(results, run, total, timeout=120) == total
    time.sleep(0.5)
    assert int(results.get(f"{run}:done") or 0) == total, "a task ran twice"
    assert_keys_in_order(results, run, keys, per_key=6)
    assert_keys_never_overlap(results, run)


def test_sigkill_with_a_full_window_loses_nothing_and_keeps_order(
        app: Celery, broker: str, start_workers: Any, results: redis.Redis) -> None:
    """Kill the whole worker (all its processes) while its windows are full, three times."""
    name, concurrency = KILL_POOL["redis" if broker.startswith("redis") else "amqp"]
    run = uuid.uuid4().hex
    keys = [f"x{n}" for n in range(40)]
    total = publish_keys(app, run, keys, per_key=10, sleep=0.1)
    kills = 3
    for kill in range(kills):
        workers = start_workers(1, "--pool", name, "--concurrency", str(concurrency))
        done = eventually(lambda kill=kill: _done(results, run) >= 20 * (kill + 1) and _done(results, run),
                          timeout=60, what="progress before the kill")
        assert done < total, "the backlog drained before the kill: nothing was in flight"
        for pid in [*workers.child_pids(), workers.process.pid]:
            # Each kill on its own: a process listed a moment ago may be gone (its parent reaped it),
            # and that must not spare the ones after it (a launcher left alive restarts its worker).
            for target in [*children(pid), pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)
        workers.process.wait(30)
    start_workers(1, "--pool", name, "--concurrency", str(concurrency))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(
            len(set(ran(results, run, k))) == 10 for k in keys):
        time.sleep(0.2)
    repeats = 0
    for key in keys:
        seqs = ran(results, run, key)
        collapsed = [s for i, s in enumerate(seqs) if i == 0 or s != seqs[i - 1]]
        repeats += len(seqs) - len(collapsed)
        assert collapsed == list(range(1, 11)), f"{key} ran as {seqs}"
    # A task killed after its effect and before the completion ledger noted it runs again.
    assert repeats <= kills * concurrency, f"{repeats} tasks ran twice"
    assert_keys_never_overlap(results, run)


def _done(results: redis.Redis, run: str) -> int:
    return int(results.get(f"{run}:done") or 0)




def test_a_hot_key_does_not_hold_back_the_other_keys_of_its_partition(
        app: Celery, start_workers: Any, results: redis.Redis) -> None:
    """Most of a partition's traffic on one key, a backlog deeper than the window: the other keys
    run past it. On Redis the fetch sets the hot key's later messages aside in the broker, so none
    goes through the database; on RabbitMQ its waiting messages are parked in batches and run in
    order behind its wake-up."""
    from ordered_tasks.models import ParkedMessage

    run = uuid.uuid4().hex
    hot, *others = same_partition_keys(6)
    task = app.tasks[ORDERED]
    sent = dict.fromkeys(others, 0)
    with app.producer_or_acquire() as producer:
        for seq in range(1, HOT_MESSAGES + 1):  # 0.05 s each: 6 s one after another
            task.apply_async(kwargs={"run": run, "key": hot, "seq": seq, "sleep": 0.05}, producer=producer)
            if seq % 3 == 0:  # a third as many messages of the other keys, interleaved
                key = others[(seq // 3) % len(others)]
                sent[key] += 1
                task.apply_async(kwargs={"run": run, "key": key, "seq": sent[key], "sleep": 0.0},
                                 producer=producer)
    start_workers(1, "--pool", "threads", "--concurrency", "8")
    eventually(lambda: all(len(ran(results, run, k)) == n for k, n in sent.items()), timeout=60,
               what="the other keys")
    done_hot = len(ran(results, run, hot))
    # Without the spill: all 120 on RabbitMQ, about 60 on Redis (its fetch looks 64 deep).
    assert done_hot <= HOT_MESSAGES // 3, (
        f"the other keys finished only after {done_hot} of {HOT_MESSAGES} hot messages")
    eventually(lambda: len(ran(results, run, hot)) == HOT_MESSAGES, timeout=60, what="the hot key")
    assert ran(results, run, hot) == list(range(1, HOT_MESSAGES + 1))
    for key, count in sent.items():
        assert ran(results, run, key) == list(range(1, count + 1)), key
    assert_keys_never_overlap(results, run)
    if app.conf.broker_url.startswith("redis"):
        assert status(hot) is None, "a key that is only busy went through the database"
        assert not ParkedMessage.objects.filter(key=hot).exists()
        broker = redis.Redis.from_url(app.conf.broker_url)
        left = broker.keys(f"ordered_tasks:aside:{get_settings().queue_prefix}.*")
        assert not left, f"lists set aside were left behind: {left}"
        return
    eventually(lambda: status(hot) == "active", timeout=10, what="the hot key active again")
    assert not ParkedMessage.objects.filter(key=hot).exists()


def test_a_keys_first_message_still_waiting_in_a_busy_pool_is_parked_ahead_of_its_crowd(
        app: Celery, start_workers: Any, results: redis.Redis) -> None:
    """The threads pool is busy with other partitions' slow tasks when a burst of one key crowds its
    partition's window: the key's first message was started and waits in the pool's queue. The spill
    takes it back and parks it ahead of the others at once, rather than waiting for it to run; then
    the key runs in order behind its wake-up."""
    from ordered_tasks import partition_for
    from ordered_tasks.models import ParkedMessage

    if app.conf.broker_url.startswith("redis"):
        pytest.skip("on Redis the fetch sets a busy key's messages aside in the broker: nothing spills")
    run = uuid.uuid4().hex
    crowded = f"acct-{uuid.uuid4().hex[:8]}"
    busy: list[str] = []
    n = 0
    while len(busy) < 40:  # keys of the other partitions
        n += 1
        if partition_for(f"{crowded}-busy-{n}") != partition_for(crowded):
            busy.append(f"{crowded}-busy-{n}")
    task = app.tasks[ORDERED]
    burst = 30
    with app.producer_or_acquire() as producer:
        for key in busy:  # 40 x 0.25 s on 2 threads: the pool's queue is 5 s deep
            task.apply_async(kwargs={"run": run, "key": key, "seq": 1, "sleep": 0.25}, producer=producer)
    start_workers(1, "--pool", "threads", "--concurrency", "2")
    eventually(lambda: sum(len(ran(results, run, key)) for key in busy) >= 2, timeout=20,
               what="the busy keys running")
    with app.producer_or_acquire() as producer:  # behind about 36 busy tasks in the pool's queue
        for seq in range(1, burst + 1):
            task.apply_async(kwargs={"run": run, "key": crowded, "seq": seq, "sleep": 0.0}, producer=producer)
    eventually(lambda: ParkedMessage.objects.filter(key=crowded).count() >= 9, timeout=20,
               what="the crowded key's messages parked")
    assert ran(results, run, crowded) == [], "the spill waited for the key's first message to run"
    first = ParkedMessage.objects.filter(key=crowded).order_by("position").first()
    assert first is not None and json.loads(bytes(first.body))[1]["seq"] == 1  # parked first
    eventually(lambda: len(ran(results, run, crowded)) == burst, timeout=60, what="the crowded key")
    assert ran(results, run, crowded) == list(range(1, burst + 1))
    eventually(lambda: all(ran(results, run, key) == [1] for key in busy), timeout=60, what="the busy keys")
    assert_keys_never_overlap(results, run)
    eventually(lambda: status(crowded) == "active", timeout=10, what="the crowded key active again")
    assert not ParkedMessage.objects.filter(key=crowded).exists()
