"""Messages from producers that are not ordered_tasks': missing or wrong headers, wrong queues, raw items."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from ordered_tasks import partition_for
from ordered_tasks.conf import get_settings
from ordered_tasks.models import AccountState, ParkedMessage
from ordered_tasks.queues import partition_queue
from tests.conftest import eventually, wait_done
from tests.support.workload import T, fail, ran

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("shared_db")]


def raw_publish(app: Celery, task: str, kwargs: dict[str, Any], *, queue_of: str,
                headers: dict[str, Any]) -> str:
    """Publish a protocol-2 message as another language's client would, bypassing Celery's publish."""
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task, args=(), kwargs=kwargs)
    full = {k: v for k, v in message.headers.items() if v is not None}
    full.update(headers)
    queue = partition_queue(get_settings().queue_prefix, partition_for(queue_of))
    with app.producer_or_acquire() as producer:
        producer.publish(message.body, exchange=queue.exchange, routing_key=queue.routing_key,
                         headers=full, serializer="json", declare=[queue], retry=True)
    return task_id


def rows(task_id: str) -> list[tuple[str, str, str]]:
    return list(ParkedMessage.objects.filter(task_id=task_id).values_list("key", "reason", "state"))


def status(key: str) -> str | None:
    return AccountState.objects.filter(key=key).values_list("status", flat=True).first()


def other_partition_key(key: str) -> str:
    n = 0
    while partition_for(f"{key}-{n}") == partition_for(key):
        n += 1
    return f"{key}-{n}"


def same_partition_key(key: str) -> str:
    n = 0
    while partition_for(f"{key}-{n}") != partition_for(key):
        n += 1
    return f"{key}-{n}"


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex


def test_a_failure_without_the_key_header_blocks_the_key_found_in_the_arguments(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    key = f"nohdr-{run[:8]}"
    fail(results, run, key, 1)
    start_workers(1)
    task_id = raw_publish(app, T + "strict_step", {"run": run, "key": key, "seq": 1}, queue_of=key, headers={})
    eventually(lambda: status(key) == "blocked", timeout=30, what="the key to be blocked")
    assert rows(task_id) == [(key, "failed", "parked")]
    app.tasks[T + "ordered_record"].delay(run=run, key=key, seq=2)
    eventually(lambda: ParkedMessage.objects.filter(key=key).count() == 2, timeout=30,
               what="the later message to be parked behind the failure")
    assert ran(results, run, key) == []


def test_a_key_header_without_the_partition_header_runs(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    key = f"nopart-{run[:8]}"
    start_workers(1)
    raw_publish(app, T + "ordered_record", {"run": run, "key": key, "seq": 1}, queue_of=key,
                headers={"ordered_key": key})
    app.tasks[T + "ordered_record"].delay(run=run, key=key, seq=2)
    assert wait_done(results, run, 2, timeout=30) == 2
    assert ran(results, run, key) == [1, 2]


def test_headers_that_disagree_with_the_queue_or_arguments_are_parked_with_the_reason(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    key = f"wrong-{run[:8]}"
    start_workers(1)
    publish = app.tasks[T + "ordered_record"]
    right = partition_for(key)
    wrong_partition = raw_publish(app, T + "ordered_record", {"run": run, "key": key, "seq": 1}, queue_of=key,
                                  headers={"ordered_key": key, "ordered_partition": (right + 1) % 8})
    stranger = other_partition_key(key)
    wrong_queue = raw_publish(app, T + "ordered_record", {"run": run, "key": stranger, "seq": 1},
                              queue_of=key, headers={"ordered_key": stranger, "ordered_partition": right})
    neighbour = same_partition_key(key)
    other_key = raw_publish(app, T + "ordered_record", {"run": run, "key": neighbour, "seq": 1}, queue_of=key,
                            headers={"ordered_key": key, "ordered_partition": right})
    publish.delay(run=run, key=key, seq=2)
    publish.delay(run=run, key=neighbour, seq=2)
    eventually(lambda: ParkedMessage.objects.filter(task_id__in=[wrong_partition, wrong_queue, other_key])
               .count() == 3, timeout=30, what="the three misfits to be parked")
    assert rows(wrong_partition) == [(key, "misrouted", "parked")]  # blocks the key it belongs to
    assert rows(wrong_queue) == [("", "misrouted", "refused")]  # belongs to no key of this partition
    assert rows(other_key) == [(neighbour, "misrouted", "parked")]  # the key of its arguments
    eventually(lambda: ParkedMessage.objects.filter(key__in=[key, neighbour]).count() == 4, timeout=30,
               what="the later messages to be parked behind the misfits")
    assert status(key) == "blocked" and status(neighbour) == "blocked"
    assert ran(results, run, key) == [] and ran(results, run, neighbour) == [] and ran(results, run, stranger) == []
    error = ParkedMessage.objects.get(task_id=wrong_queue).exception
    assert f"belongs to partition {partition_for(stranger)}" in error


def test_a_key_too_long_to_store_is_refused_into_a_parked_row_once(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    long_key = "x" * 300
    start_workers(1)
    task_id = raw_publish(app, T + "ordered_record", {"run": run, "key": long_key, "seq": 1},
                          queue_of=long_key[:255], headers={"ordered_key": long_key})
    eventually(lambda: rows(task_id), timeout=30, what="the message to be refused into a row")
    assert rows(task_id) == [("", "invalid", "refused")]
    assert "300 characters" in ParkedMessage.objects.get(task_id=task_id).exception
    after = f"after-{run[:8]}"
    app.tasks[T + "ordered_record"].delay(run=run, key=after, seq=1)
    assert wait_done(results, run, 1, timeout=30) == 1
    assert len(rows(task_id)) == 1  # parked once, not returned and run again


def test_a_plain_task_sent_to_a_partition_queue_is_parked_not_run(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    key = f"plain-{run[:8]}"
    workers = start_workers(1)
    task_id = raw_publish(app, T + "plain_record", {"run": run, "key": key, "seq": 1}, queue_of=key,
                          headers={"ordered_key": key, "ordered_partition": partition_for(key)})
    garbled = raw_publish(app, T + "plain_record", {"run": run, "key": key, "seq": 2}, queue_of=key,
                          headers={"ordered_key": key, "ordered_partition": "x"})  # not a number
    eventually(lambda: rows(task_id) and rows(garbled), timeout=30, what="both messages to be parked")
    assert rows(task_id) == [(key, "invalid", "parked")]
    assert rows(garbled) == [(key, "invalid", "parked")]  # the queue's partition, whatever the header
    assert ran(results, run, key) == []
    assert workers.process.poll() is None and len(workers.child_pids()) == 1


def test_raw_redis_items_the_fetch_cannot_record_are_parked_not_lost(
        app: Celery, broker: str, start_workers: Any, results: redis.Redis, run: str) -> None:
    if not broker.startswith("redis"):
        pytest.skip("the Redis transport's envelope")
    key = f"raw-{run[:8]}"
    queue = partition_queue(get_settings().queue_prefix, partition_for(key)).name
    client = redis.Redis.from_url(broker)
    envelope = {"body": "W10=", "content-type": "application/json", "content-encoding": "utf-8",
                "headers": {"task": T + "ordered_record", "id": run}, "properties": {"body_encoding": "base64"}}
    client.lpush(queue, json.dumps(envelope))  # no delivery_tag, no delivery_info
    client.lpush(queue, b"\xff not json at all")
    start_workers(1)
    eventually(lambda: ParkedMessage.objects.filter(partition=partition_for(key), reason="invalid",
                                                    headers__has_key="x-ordered-tasks-raw").count() == 2,
               timeout=30, what="both raw items to be parked")
    bodies = {bytes.fromhex(bytes(row.body).decode()) for row in
              ParkedMessage.objects.filter(headers__has_key="x-ordered-tasks-raw", partition=partition_for(key))}
    assert b"\xff not json at all" in bodies and json.dumps(envelope).encode() in bodies
    app.tasks[T + "ordered_record"].delay(run=run, key=key, seq=1)
    assert wait_done(results, run, 1, timeout=30) == 1  # the partition goes on
    assert client.llen(queue) == 0


NODE_PRODUCER = Path(__file__).resolve().parent.parent / "examples" / "node" / "publish.js"


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.skip("Node.js is not installed")
    return found


@pytest.mark.parametrize("partitions", [1, 8, 16, 1024])
def test_the_node_example_producer_hashes_keys_like_python(partitions: int) -> None:
    keys = ["account-1", "42", "-7", "ü-ñ", "18446744073709551617", *(f"acct-{n}" for n in range(50))]
    out = subprocess.run([node(), str(NODE_PRODUCER), "--vectors", str(partitions), *keys],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    found = {json.loads(line)[0]: json.loads(line)[1][0] for line in out.splitlines()}
    assert found == {key: partition_for(int(key) if key.lstrip("-").isdigit() else key, partitions)
                     for key in keys}


def test_messages_from_the_node_example_producer_run_in_order_with_python_ones(
        app: Celery, broker: str, start_workers: Any, results: redis.Redis, run: str) -> None:
    if not broker.startswith("redis"):
        pytest.skip("the example producer speaks Redis")
    keys = [f"node-{run[:6]}-{n}" for n in range(4)]
    conf = get_settings()

    def from_node(seq: int) -> None:
        subprocess.run([node(), str(NODE_PRODUCER), "--redis", broker, "--prefix", conf.queue_prefix,
                        "--partitions", str(conf.partitions), "--task", T + "ordered_record",
                        "--key", ",".join(keys), "--kwargs", json.dumps({"run": run, "key": "$KEY", "seq": seq})],
                       check=True, timeout=30, capture_output=True)

    start_workers(1)
    from_node(1)
    for key in keys:
        app.tasks[T + "ordered_record"].delay(run=run, key=key, seq=2)
    from_node(3)
    assert wait_done(results, run, 12, timeout=30) == 12
    assert all(ran(results, run, key) == [1, 2, 3] for key in keys)
    assert not ParkedMessage.objects.filter(key__in=keys).exists()


def test_messages_without_the_key_header_keep_their_place_behind_a_hot_keys_messages(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    """On Redis the fetch sets a busy key's messages aside; one without the header, whose key only
    the worker reads, goes behind them instead of overtaking them."""
    key, total = f"hot-{run[:6]}", 60
    task = app.tasks[T + "ordered_record"]
    for seq in range(1, total + 1):
        kwargs = {"run": run, "key": key, "seq": seq, "sleep": 0.02}
        if seq % 5 == 0:
            raw_publish(app, T + "ordered_record", kwargs, queue_of=key, headers={})
        else:
            task.apply_async(kwargs=kwargs)
    start_workers(1, "--pool", "threads", "--concurrency", "8")
    assert wait_done(results, run, total, timeout=60) == total
    assert ran(results, run, key) == list(range(1, total + 1))
    assert not ParkedMessage.objects.filter(key=key).exists()


def test_a_partition_queue_declared_without_single_active_consumer_is_reported_and_the_rest_served(
        app: Celery, broker: str, start_workers: Any, results: redis.Redis, run: str,
        capfd: pytest.CaptureFixture[str]) -> None:
    if not broker.startswith("amqp"):
        pytest.skip("queue arguments are RabbitMQ's")
    from kombu import Queue

    bad, good = f"nosac-{run[:6]}", f"fine-{run[:6]}"
    while partition_for(good) == partition_for(bad):
        good += "x"
    name = partition_queue(get_settings().queue_prefix, partition_for(bad)).name
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        channel.queue_delete(name)
        Queue(name, durable=True)(channel).declare()  # as celery-node does: no arguments
    try:
        workers = start_workers(1)
        task = app.tasks[T + "ordered_record"]
        task.delay(run=run, key=good, seq=1)
        assert wait_done(results, run, 1, timeout=30) == 1
        with app.connection_for_write() as conn:
            # as another producer publishes into its queue
            conn.Producer().publish({}, exchange="", routing_key=name, serializer="json")
        time.sleep(3)
        assert workers.process.poll() is None and len(workers.child_pids()) == 1
        output = capfd.readouterr()
        text = output.out + output.err
        assert text.count(f"Not consuming partition {partition_for(bad)}") == 1
        assert "exited with" not in text  # the worker was not restarted
        with app.connection_for_write() as conn:
            _, depth, _ = conn.default_channel.queue_declare(name, passive=True)
        assert depth == 1  # left waiting, not consumed without single active consumer
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(name)


@pytest.mark.e2e
def test_after_a_failover_to_another_broker_url_the_worker_still_fetches_reliably(
        app: Celery, broker: str, results: redis.Redis, run: str) -> None:
    """``broker_url = "redis://down;redis://up"``: kombu's failover must not bring back its own transport."""
    if not broker.startswith("redis"):
        pytest.skip("the Redis transport's envelope")
    from tests.conftest import Workers

    with socket.socket() as probe:  # a port where no broker answers
        probe.bind(("127.0.0.1", 0))
        down = probe.getsockname()[1]
    key = f"failover-{run[:8]}"
    queue = partition_queue(get_settings().queue_prefix, partition_for(key)).name
    redis.Redis.from_url(broker).lpush(queue, b"\xff raw")  # only the reliable fetch parks this
    workers = Workers(app, f"redis://127.0.0.1:{down}/14;{broker}", 1, [])
    try:
        workers.wait_ready()
        eventually(lambda: ParkedMessage.objects.filter(partition=partition_for(key), reason="invalid",
                                                        headers__has_key="x-ordered-tasks-raw").exists(),
                   timeout=30, what="the raw item to be parked by the reliable fetch")
        app.tasks[T + "ordered_record"].delay(run=run, key=key, seq=1)
        assert wait_done(results, run, 1, timeout=30) == 1
    finally:
        workers.stop()


def test_a_revoked_message_without_the_key_header_is_kept_as_a_record(
        app: Celery, start_workers: Any, results: redis.Redis, run: str) -> None:
    key = f"acct-{run[:6]}"
    task = app.tasks[T + "ordered_record"]
    start_workers(1)
    task.delay(run=run, key=key, seq=1, sleep=2.0)
    task_id = raw_publish(app, T + "ordered_record", {"run": run, "key": key, "seq": 2}, queue_of=key, headers={})
    app.control.revoke(task_id)
    task.delay(run=run, key=key, seq=3)
    assert wait_done(results, run, 2, timeout=30) == 2
    assert ran(results, run, key) == [1, 3]
    # Under the key of its arguments: the operator finds it with the account's other messages.
    assert eventually(lambda: rows(task_id), timeout=10, what="the revoked message's record") == [
        (key, "revoked", "skipped")]
