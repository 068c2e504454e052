"""Failures against real brokers and workers: in-place retries, blocking, parking, replay, skip."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from typing import Any

import pytest
import redis
from celery import Celery
from django.core.management import call_command
from kombu import Producer

from ordered_tasks import partition_for, replay
from ordered_tasks.conf import get_settings
from ordered_tasks.models import AccountState, ParkedMessage
from ordered_tasks.queues import partition_queue
from ordered_tasks.worker.exclusivity.leases import LeaseKeeper
from tests.conftest import eventually, wait_done
from tests.support.workload import T, fail, parked, publish, ran, same_partition_keys, status

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("shared_db")]


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex


@pytest.fixture(autouse=True)
def control_through(app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    """replay() and the commands publish with the project's Celery app: here, the test's broker."""
    monkeypatch.setattr("ordered_tasks.celery_app.find_celery_app", lambda _path=None: app)


def test_failure_blocks_its_key_parks_later_messages_and_replay_runs_them_in_order(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    bad, good = same_partition_keys(2)
    fail(results, run, bad, 2)
    start_workers(1)
    publish(app, "strict_step", run, (bad, 1), (good, 1), (bad, 2), (good, 2), (bad, 3), (good, 3), (bad, 4))
    eventually(lambda: len(parked(bad)) == 3, what="three parked messages")
    assert wait_done(results, run, 4) == 4
    assert ran(results, run, good) == [1, 2, 3]
    assert ran(results, run, bad) == [1]
    assert status(bad) == "blocked" and status(good) is None
    publish(app, "strict_step", run, (bad, 5), (good, 4))
    eventually(lambda: len(parked(bad)) == 4, what="a message published while blocked to park")
    assert parked(bad) == [("failed", "parked")] + [("key_held", "parked")] * 3
    results.delete(f"{run}:fail:{bad}:2")
    replay(bad, requested_by="test")
    publish(app, "strict_step", run, (bad, 6))
    eventually(lambda: ran(results, run, bad) == [1, 2, 3, 4, 5, 6], what="the replayed key to catch up")
    assert eventually(lambda: status(bad) == "active")
    assert parked(bad) == [] and ran(results, run, good) == [1, 2, 3, 4]


def test_failing_again_during_replay_blocks_again_and_skip_moves_on(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    key = same_partition_keys(1)[0]
    fail(results, run, key, 2)
    start_workers(1)
    publish(app, "strict_step", run, (key, 1), (key, 2), (key, 3), (key, 4))
    eventually(lambda: len(parked(key)) == 3, what="parking")
    call_command("ordered_replay", key, by="operator")
    eventually(lambda: AccountState.objects.get(key=key).blocks == 2, what="the replay to fail again")
    assert ran(results, run, key) == [1] and status(key) == "blocked"
    assert int(results.get(f"{run}:attempts:{key}:2") or 0) == 2
    assert ParkedMessage.objects.filter(key=key).order_by("position").first().attempts == 2  # type: ignore[union-attr]
    call_command("ordered_skip", key, by="operator")
    eventually(lambda: ran(results, run, key) == [1, 3, 4], what="the rest to run after skip")
    assert eventually(lambda: status(key) == "active")
    assert parked(key) == [("failed", "skipped")]


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_transient_failure_backs_off_in_place_while_other_keys_of_its_partition_run(
        app: Celery, start_workers: Any, results: redis.Redis, run: str, pool: str) -> None:
    slow, *others = same_partition_keys(4)
    fail(results, run, slow, 1, times=2)
    start_workers(1, "--pool", pool)
    publish(app, "autoretry_step", run, (slow, 1), (slow, 2), *[(k, s) for s in (1, 2, 3) for k in others])
    assert wait_done(results, run, 11, timeout=60) == 11
    assert ran(results, run, slow) == [1, 2]
    spans = [entry.split("|") for entry in results.lrange(f"{run}:spans", 0, -1)]
    slow_start = min(float(s[2]) for s in spans if s[0] == slow)
    others_end = max(float(s[3]) for s in spans if s[0] != slow)
    assert others_end < slow_start, "other keys waited for the retrying key"
    assert slow_start - min(float(s[2]) for s in spans) >= 2.5  # two in-place retries: 1 s, then 2 s
    eventually(lambda: status(slow) == "active", what="the key to become active after its backlog ran")
    state = AccountState.objects.get(key=slow)
    assert (state.retries, state.failures) == (2, 2)
    assert int(results.get(f"{run}:attempts:{slow}:1") or 0) == 3


def test_self_retry_and_continue_policy(app: Celery, start_workers: Any, results: redis.Redis,
                                        run: str) -> None:
    retrying, lenient = same_partition_keys(2)
    fail(results, run, retrying, 1, times=2)
    fail(results, run, lenient, 1)
    start_workers(1)
    publish(app, "self_retry_step", run, (retrying, 1), (retrying, 2))
    publish(app, "lenient_step", run, (lenient, 1), (lenient, 2))
    assert wait_done(results, run, 3) == 3
    assert ran(results, run, retrying) == [1, 2]
    assert results.lrange(f"{run}:retries:{retrying}", 0, -1) == ["2", "0"]
    assert ran(results, run, lenient) == [2]
    assert parked(lenient) == [("failed", "failed")] and status(lenient) == "active"


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_unknown_task_and_undecodable_messages_are_parked_not_lost(
        app: Celery, start_workers: Any, results: redis.Redis, run: str, pool: str) -> None:
    key = same_partition_keys(1)[0]
    queue = partition_queue(get_settings().queue_prefix, partition_for(key))
    start_workers(1, "--pool", pool)

    def raw(task: str, body: bytes) -> None:
        headers = {"lang": "py", "task": task, "id": str(uuid.uuid4()), "retries": 0,
                   "ordered_key": key, "ordered_partition": partition_for(key)}
        with app.connection_for_write() as conn:
            Producer(conn).publish(body, exchange=queue.exchange, routing_key=queue.routing_key,
                                   headers=headers, content_type="application/json",
                                   content_encoding="utf-8", declare=[queue])

    good = json.dumps([[], {"run": run, "key": key, "seq": 1}, {}]).encode()
    raw("tests.no_such_task", good)
    raw(T + "strict_step", b"[[], {not json")
    publish(app, "strict_step", run, (key, 2))
    eventually(lambda: len(parked(key)) == 3, what="three parked messages")
    rows = list(ParkedMessage.objects.filter(key=key).order_by("position"))
    assert [r.reason for r in rows] == ["unknown_task", "undecodable", "key_held"]
    assert bytes(rows[0].body) == good and bytes(rows[1].body) == b"[[], {not json"
    assert "tests.no_such_task" in rows[0].exception
    assert status(key) == "blocked" and ran(results, run, key) == []
    # The book of held keys lives in the process that runs tasks: after a replay
    # the (still unknown) head blocks again, and a new message waits behind it.
    replay(key)
    eventually(lambda: AccountState.objects.get(key=key).blocks == 2, what="the replay to block again")
    publish(app, "strict_step", run, (key, 3))
    eventually(lambda: len(parked(key)) == 4, what="the new message to park")
    assert ran(results, run, key) == []


def test_a_message_whose_pool_process_died_runs_again_before_the_next(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    key = same_partition_keys(1)[0]
    start_workers(1)
    publish(app, "dies_once_step", run, (key, 1), (key, 2))
    assert wait_done(results, run, 2) == 2
    assert ran(results, run, key) == [1, 2]
    assert int(results.get(f"{run}:attempts:{key}:1") or 0) == 2
    assert parked(key) == []


@pytest.mark.parametrize("name, reason", [("dying_step", "worker_lost"), ("overtime_step", "time_limit")])
def test_pool_process_dying_every_time_and_hard_time_limit_park_the_message(
        app: Celery, start_workers: Any, results: redis.Redis, run: str, name: str, reason: str) -> None:
    key = same_partition_keys(1)[0]
    start_workers(1)
    publish(app, name, run, (key, 1))
    publish(app, "strict_step", run, (key, 2))
    eventually(lambda: len(parked(key)) == 2, what="both messages to park")
    assert parked(key) == [(reason, "parked"), ("key_held", "parked")]
    assert status(key) == "blocked" and ran(results, run, key) == []


def test_revoked_message_is_kept_as_a_record_and_its_key_goes_on(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    key = same_partition_keys(1)[0]
    workers = start_workers(1)
    task_id = str(uuid.uuid4())
    assert app.control.revoke(task_id, destination=workers.nodes, reply=True, timeout=5)
    app.tasks[T + "strict_step"].apply_async(kwargs={"run": run, "key": key, "seq": 1}, task_id=task_id)
    publish(app, "strict_step", run, (key, 2))
    assert wait_done(results, run, 1) == 1
    assert ran(results, run, key) == [2]
    row = eventually(lambda: ParkedMessage.objects.filter(key=key).first(), what="the revoked record")
    assert (row.reason, row.state, row.task_id) == ("revoked", "skipped", task_id)
    assert status(key) == "active"


def test_a_revoke_is_honoured_by_a_worker_started_after_it(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    from ordered_tasks.models import RevokedTask

    key = same_partition_keys(1)[0]
    first = start_workers(1)
    task_id = str(uuid.uuid4())
    assert app.control.revoke(task_id, destination=first.nodes, reply=True, timeout=5)
    eventually(lambda: RevokedTask.objects.filter(task_id=task_id).exists(), timeout=10,
               what="the revoke to be kept")
    assert first.stop() == 0
    app.tasks[T + "strict_step"].apply_async(kwargs={"run": run, "key": key, "seq": 1}, task_id=task_id)
    publish(app, "strict_step", run, (key, 2))
    start_workers(1)  # knows nothing of the revoke but what was kept
    assert wait_done(results, run, 1) == 1
    assert ran(results, run, key) == [2]
    row = eventually(lambda: ParkedMessage.objects.filter(key=key).first(), what="the revoked record")
    assert (row.reason, row.state, row.task_id) == ("revoked", "skipped", task_id)


def test_task_ordered_by_routes_blocks_and_replays_like_a_decorated_one(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    key = same_partition_keys(1)[0]
    fail(results, run, key, 1)
    start_workers(1)
    for seq in (1, 2):
        app.send_task("events.external_step", kwargs={"run": run, "key": key, "seq": seq})
    eventually(lambda: len(parked(key)) == 2, what="parking")
    assert parked(key) == [("failed", "parked"), ("key_held", "parked")]
    results.delete(f"{run}:fail:{key}:1")
    replay(key)
    eventually(lambda: ran(results, run, key) == [1, 2], what="the replay")


def test_a_retry_survives_a_restart_of_the_workers(app: Celery, start_workers: Any, results: redis.Redis,
                                                   run: str) -> None:
    key = same_partition_keys(1)[0]
    fail(results, run, key, 1, times=1)
    workers = start_workers(1)
    publish(app, "patient_step", run, (key, 1), (key, 2))
    eventually(lambda: len(parked(key)) == 2, what="the retry and the message behind it")
    assert workers.stop() == 0
    from tests.conftest import purge_all

    purge_all(app)  # the pending wake-up is gone too: the restarted worker must find the retry itself
    start_workers(1)
    eventually(lambda: ran(results, run, key) == [1, 2], what="the retry after the restart")
    assert eventually(lambda: status(key) == "active")


def test_other_keys_published_while_a_retry_waits_run_before_it(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    """The retry's wake-up message waits in the worker; the partition's later messages do not wait for it."""
    slow, *others = same_partition_keys(3)
    fail(results, run, slow, 1, times=2)  # retried in place after 1 s, then 2 s
    start_workers(1)
    publish(app, "autoretry_step", run, (slow, 1))
    eventually(lambda: status(slow) == "retrying", what="the first failure")
    publish(app, "autoretry_step", run, *[(k, s) for s in (1, 2) for k in others])
    assert wait_done(results, run, 5, timeout=60) == 5
    spans = [entry.split("|") for entry in results.lrange(f"{run}:spans", 0, -1)]
    slow_start = min(float(s[2]) for s in spans if s[0] == slow)
    others_end = max(float(s[3]) for s in spans if s[0] != slow)
    assert others_end < slow_start, "the partition waited for the retry's wake-up"


def test_with_several_pool_processes_a_blocked_key_is_held_in_every_one_of_them(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    """``--concurrency 2``: whichever pool process runs the key's later messages parks them.

    (That a process reads a partition again after another one changed it is
    shown deterministically in ``test_guard``; which process Celery picks
    here is up to its scheduling.)
    """
    bad, good = same_partition_keys(2)
    other = next(k for k in (f"other-{run[:6]}-{n}" for n in range(1000)) if partition_for(k) != partition_for(bad))
    fail(results, run, bad, 4)
    start_workers(1, "--concurrency", "2")
    for seq in range(1, 13):  # another partition keeps one process or the other busy
        publish(app, "strict_step", run, (bad, seq), (good, seq))
        app.tasks[T + "ordered_record"].delay(run, other, seq, sleep=0.03)
    assert wait_done(results, run, 3 + 12 + 12) == 27
    eventually(lambda: len(parked(bad)) == 9, what="the failed message and the eight behind it")
    assert ran(results, run, bad) == [1, 2, 3]
    assert ran(results, run, good) == list(range(1, 13)) and ran(results, run, other) == list(range(1, 13))
    # Parked one by one behind the block, or (eight waiting in the window at once) in one batch.
    assert parked(bad)[0] == ("failed", "parked")
    assert set(parked(bad)[1:]) <= {("key_held", "parked"), ("overflow", "parked")}
    assert status(bad) == "blocked"


def _hand_partition_to_another_worker_and_back(app: Celery, broker_url: str, partition: int) -> None:
    """The worker loses ``partition`` for a moment and gets it back, as when another worker had it meanwhile.

    Redis: another owner takes the lease for 3 seconds. RabbitMQ: the
    worker's connection closes, so the queue's single active consumer
    moves, and the worker reconnects.
    """
    if broker_url.startswith("redis"):
        conf = get_settings()
        client = redis.Redis.from_url(conf.coordination_url(broker_url) or broker_url)
        keeper = LeaseKeeper(client, conf.queue_prefix, [])
        fence = int(client.get(keeper.fence_key(partition)) or 0)
        client.set(keeper.lease_key(partition), "another-worker", px=3000)
        eventually(lambda: int(client.get(keeper.fence_key(partition)) or 0) > fence,
                   what="the worker to take its lease back")
        return
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not available to close the worker's connection")
    subprocess.run(["rabbitmqctl", "close_all_connections", "test: partition handed over"],
                   check=True, capture_output=True, timeout=120)


@pytest.mark.restarts_broker
def test_a_worker_that_gets_a_partition_back_reads_its_key_states_again(
        app: Celery, broker: str, start_workers: Any, results: redis.Redis, run: str) -> None:
    """Key states another worker changed while this one had lost the partition are not answered from memory."""
    key = same_partition_keys(1)[0]
    start_workers(1)
    publish(app, "strict_step", run, (key, 1))
    assert wait_done(results, run, 1) == 1  # the worker's book now has the partition: key active
    # Meanwhile another worker held the partition, and a message of the key failed there.
    AccountState.objects.create(key=key, partition=partition_for(key), status="blocked")
    _hand_partition_to_another_worker_and_back(app, broker, partition_for(key))
    publish(app, "strict_step", run, (key, 2))
    eventually(lambda: parked(key) or ran(results, run, key) != [1], timeout=60,
               what="the message of a key blocked meanwhile to be parked or run")
    assert ran(results, run, key) == [1], "ran although its key was blocked"
    assert parked(key) == [("key_held", "parked")]
