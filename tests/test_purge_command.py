"""``manage.py ordered_purge``: partition queues emptied into parked rows, never with a consumer."""

from __future__ import annotations

import io
import uuid
from typing import Any

import pytest
import redis
from celery import Celery
from django.core.management import CommandError, call_command
from django.db import DatabaseError
from kombu import Connection, Producer

from ordered_tasks import partition_for, replay, skip
from ordered_tasks.conf import get_settings
from ordered_tasks.messages import publish_control
from ordered_tasks.models import AccountState, ControlRequest, ParkedMessage
from ordered_tasks.purge import _Store
from ordered_tasks.queues import partition_queue
from ordered_tasks.redisscripts import aside_index, aside_list
from ordered_tasks.states import ControlAction
from tests.conftest import eventually, queue_depths
from tests.support.workload import T, parked, publish, ran, same_partition_keys, status

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("shared_db")]


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex


@pytest.fixture(autouse=True)
def control_through(app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command, replay() and skip() use the project's Celery app: here, the test's broker."""
    monkeypatch.setattr("ordered_tasks.celery_app.find_celery_app", lambda _path=None: app)


def queue_of(key: str) -> str:
    return partition_queue(get_settings().queue_prefix, partition_for(key)).name


def other_partition_key(key: str) -> str:
    n = 0
    while partition_for(f"other-{n}") == partition_for(key):
        n += 1
    return f"other-{n}"


def wait_queued(app: Celery, expected: dict[str, int]) -> None:
    eventually(lambda: all(queue_depths(app)[q] == n for q, n in expected.items()),
               what=f"queue depths {expected}")


def purge(*partitions: int, **options: Any) -> str:
    out = io.StringIO()
    call_command("ordered_purge", partition=list(partitions), yes=True, by="tester", stdout=out, **options)
    return out.getvalue()


def refused(partition: int) -> str:
    """Purge ``partition``, which must be refused; returns why."""
    err = io.StringIO()
    with pytest.raises(CommandError, match=f"Not purged .*partition\\(s\\) {partition}"):
        call_command("ordered_purge", partition=[partition], yes=True, stdout=io.StringIO(), stderr=err)
    return err.getvalue()


def seqs(key: str) -> list[int]:
    rows = ParkedMessage.objects.filter(key=key).order_by("position")
    return [row.arguments()[1]["seq"] for row in rows]  # type: ignore[index]


def test_purged_messages_are_parked_per_key_and_replay_runs_them_in_order(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    a, b = same_partition_keys(2)
    c = other_partition_key(a)
    publish(app, "strict_step", run, (a, 1), (b, 1), (a, 2), (c, 1), (a, 3))
    wait_queued(app, {queue_of(a): 4, queue_of(c): 1})
    out = purge(partition_for(a))
    assert "4 message(s) taken: 4 parked, blocking 2 key(s)" in out
    assert queue_depths(app)[queue_of(a)] == 0 and queue_depths(app)[queue_of(c)] == 1
    assert parked(a) == [("purged", "parked")] * 3 and seqs(a) == [1, 2, 3]
    assert parked(b) == [("purged", "parked")]
    assert status(a) == status(b) == "blocked"
    assert AccountState.objects.get(key=a).blocks == 1
    publish(app, "strict_step", run, (a, 4))  # after the purge: waits in the queue, behind its key
    workers = start_workers(1)
    eventually(lambda: ran(results, run, c) == [1], what="the other partition to run")
    eventually(lambda: len(parked(a)) == 4, what="the later message to park behind the purged ones")
    assert parked(a)[-1] == ("key_held", "parked") and ran(results, run, a) == []
    assert "consumer" in refused(partition_for(a))  # while a worker consumes the partition
    replay(a, requested_by="test")
    skip(b, requested_by="test")
    eventually(lambda: ran(results, run, a) == [1, 2, 3, 4], what="the replay, in order")
    eventually(lambda: status(a) == "active" and status(b) == "active", what="both keys to resume")
    assert ran(results, run, b) == [] and parked(b) == [("purged", "skipped")]
    workers.stop()


def test_a_partition_with_a_consumer_is_refused_and_left_alone(app: Celery, broker: str, run: str) -> None:
    key = same_partition_keys(1)[0]
    publish(app, "strict_step", run, (key, 1), (key, 2))
    wait_queued(app, {queue_of(key): 2})
    queue = partition_queue(get_settings().queue_prefix, partition_for(key))
    with Connection(broker) as conn:
        if conn.transport.driver_type == "redis":  # a worker holds the partition's lease
            holder = redis.Redis.from_url(get_settings().redis_url or broker)
            lease = f"ordered_tasks:lease:{queue.name}"
            holder.set(lease, "host:1234:worker", px=10_000)
            try:
                assert "active consumer (host:1234:worker)" in refused(partition_for(key))
            finally:
                holder.delete(lease)
        else:  # a worker (or a standby) consumes the queue
            channel = conn.channel()
            channel.basic_qos(0, 1, False)
            channel.basic_consume(queue=queue.name, no_ack=False, callback=lambda message: None)
            assert "has 1 consumer(s)" in refused(partition_for(key))
    wait_queued(app, {queue.name: 2})
    assert parked(key) == [] and status(key) is None


def test_discard_keeps_skipped_records_and_leaves_the_keys_running(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    a, b = same_partition_keys(2)
    publish(app, "strict_step", run, (a, 1), (b, 1), (a, 2))
    wait_queued(app, {queue_of(a): 3})
    assert "3 discarded" in purge(partition_for(a), discard=True)
    assert parked(a) == [("purged", "skipped")] * 2 and seqs(a) == [1, 2]
    assert status(a) == status(b) == "active"
    publish(app, "strict_step", run, (a, 3))
    start_workers(1)
    eventually(lambda: ran(results, run, a) == [3], what="the key's next message to run at once")
    assert ran(results, run, b) == []


def test_foreign_and_control_messages(app: Celery, broker: str, run: str) -> None:
    key = same_partition_keys(1)[0]
    stranger = other_partition_key(key)
    queue = partition_queue(get_settings().queue_prefix, partition_for(key))
    state = AccountState.objects.create(key=key, partition=partition_for(key), status="blocked")
    request = ControlRequest.objects.create(key=key, action="replay", requested_by="x", epoch=state.epoch)
    publish_control(app, key, ControlAction.REPLAY, request.pk)
    with Connection(broker) as conn:  # a producer that got the wire format wrong: another partition's key
        Producer(conn.default_channel).publish(
            [[], {"run": run, "key": stranger, "seq": 1}, {}], exchange=queue.exchange,
            routing_key=queue.routing_key, serializer="json",
            headers={"task": T + "strict_step", "id": "foreign-1"})
    publish(app, "strict_step", run, (key, 1))
    wait_queued(app, {queue.name: 3})
    out = purge(partition_for(key))
    assert "1 parked" in out and "1 kept as refused" in out and "1 control message(s) dropped" in out
    assert parked("")[-1:] == [("purged", "refused")]
    assert ParkedMessage.objects.get(task_id="foreign-1").key == ""
    assert parked(key) == [("purged", "parked")]
    request.refresh_from_db()
    assert request.applied_at is None and request.outcome.startswith("not applied")


def test_redis_messages_a_dead_owner_left_unacknowledged_come_first(
        app: Celery, broker: str, results: redis.Redis, run: str) -> None:
    if not broker.startswith("redis"):
        pytest.skip("RabbitMQ puts a dead consumer's messages back in their place itself")
    key = same_partition_keys(1)[0]
    name = queue_of(key)
    publish(app, "strict_step", run, *[(key, seq) for seq in range(1, 6)])
    wait_queued(app, {name: 5})
    with Connection(broker) as conn:  # a worker took three, ran the first, and died
        channel = conn.channel()
        taken = [channel.basic_get(name, no_ack=False) for _ in range(3)]
        channel.do_restore = False
        ledger = redis.Redis.from_url(get_settings().redis_url or broker)
        ledger.zadd(f"ordered_tasks:completed:{name}", {taken[0].headers["id"]: 1.0})
    try:
        out = purge(partition_for(key))
    finally:
        ledger.delete(f"ordered_tasks:completed:{name}")
    assert "4 parked" in out and "1 already kept or completed" in out
    assert seqs(key) == [2, 3, 4, 5]
    assert queue_depths(app)[name] == 0


def test_redis_messages_set_aside_for_a_busy_key_are_purged_in_their_order(
        app: Celery, broker: str, run: str) -> None:
    if not broker.startswith("redis"):
        pytest.skip("only the Redis fetch sets messages aside")
    key, other = same_partition_keys(2)
    name = queue_of(key)
    publish(app, "strict_step", run, *[(key, seq) for seq in range(1, 6)], (other, 1))
    wait_queued(app, {name: 6})
    client = redis.Redis.from_url(broker)
    with Connection(broker) as conn:  # a worker took the first, set the next two aside, and died
        channel = conn.channel()
        channel.basic_get(name, no_ack=False)
        channel.do_restore = False
    for _ in range(2):
        client.lpush(aside_list(name, key), client.rpop(name))
    client.sadd(aside_index(name), key)
    assert queue_depths(app)[name] == 6
    out = purge(partition_for(key))
    assert "6 parked" in out
    assert seqs(key) == [1, 2, 3, 4, 5] and seqs(other) == [1]
    assert not client.exists(aside_list(name, key), aside_index(name))
    assert queue_depths(app)[name] == 0


@pytest.mark.parametrize("when", ["before the commit", "after the commit"])
def test_a_purge_that_fails_halfway_loses_nothing_and_the_next_one_goes_on_in_order(
        app: Celery, run: str, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    key = same_partition_keys(1)[0]
    publish(app, "strict_step", run, *[(key, seq) for seq in range(1, 6)])
    wait_queued(app, {queue_of(key): 5})
    monkeypatch.setattr("ordered_tasks.purge.BATCH", 2)
    save = _Store.save
    calls = []

    def failing(store: _Store, batch: list[Any], before_commit: Any) -> None:
        calls.append(len(batch))
        if len(calls) != 2:
            return save(store, batch, before_commit)
        if when == "before the commit":  # the database fails: the batch's rows are rolled back
            def before_commit() -> None:
                raise DatabaseError("the database went away")
            return save(store, batch, before_commit)
        save(store, batch, before_commit)  # stored, then the process dies before acknowledging
        raise ConnectionError("the broker went away")

    monkeypatch.setattr(_Store, "save", failing)
    with pytest.raises(CommandError, match="stays in its queue"):
        purge(partition_for(key))
    expected = [1, 2] if when == "before the commit" else [1, 2, 3, 4]
    assert seqs(key) == expected
    eventually(lambda: queue_depths(app)[queue_of(key)] == 5 - 2, what="the unstored batch back in its queue")
    monkeypatch.setattr(_Store, "save", save)
    out = purge(partition_for(key))
    assert seqs(key) == [1, 2, 3, 4, 5]  # in order, none twice
    if when == "after the commit":
        assert "2 already kept or completed" in out
    assert queue_depths(app)[queue_of(key)] == 0


def test_the_command_asks_first_and_checks_partitions(app: Celery) -> None:
    with pytest.raises(CommandError, match="--yes"):
        call_command("ordered_purge", partition=[0], stdout=io.StringIO())
    with pytest.raises(CommandError, match="no partition 99"):
        call_command("ordered_purge", partition=[99], yes=True)
    out = io.StringIO()
    call_command("ordered_purge", all=True, yes=True, stdout=out)
    assert out.getvalue().count("no message waiting") == get_settings().partitions


@pytest.mark.parametrize("broker", ["redis"], indirect=True)  # leases and fences are Redis's
def test_a_purge_that_lost_its_lease_to_a_newer_owner_stores_nothing_more(broker: str) -> None:
    from django.db import transaction

    from ordered_tasks.models import PartitionFence
    from ordered_tasks.purge import PurgeRefused, _check_fence

    partition = 0
    PartitionFence.objects.filter(partition=partition).delete()
    with transaction.atomic():
        _check_fence(partition, 5)  # the first owner: recorded
    assert PartitionFence.objects.get(partition=partition).fence == 5
    with pytest.raises(PurgeRefused, match=r"newer owner \(fence 5 > 4\)"), transaction.atomic():
        _check_fence(partition, 4)
    assert PartitionFence.objects.get(partition=partition).fence == 5
    PartitionFence.objects.filter(partition=partition).delete()
