"""Partitions keep moving: quiet spells longer than the broker's timeouts, acknowledgements Redis refused."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange, Queue

from tests.conftest import eventually, holding_consumer, wait_done

pytestmark = pytest.mark.integration
ORDERED = "tests.testapp.tasks.ordered_record"


@pytest.fixture
def quick_health_checks(redis_broker: str) -> Iterator[redis.Redis]:
    """A client whose pool PINGs before a command on a connection quiet for more than 2 s."""
    client = redis.Redis.from_url(redis_broker, health_check_interval=2)
    yield client
    client.close()


def test_unanswered_writes_survive_a_health_check_after_a_quiet_spell(
        quick_health_checks: redis.Redis) -> None:
    """redis-py's PING must not read a reply that a write left unread (kombu's pools PING after 25 s)."""
    from ordered_tasks.worker.unanswered import Unanswered

    key = f"quiet-{uuid.uuid4().hex[:8]}"
    writer = Unanswered(quick_health_checks.connection_pool, "a test")
    writer.send(("RPUSH", key, "before"))
    time.sleep(2.5)  # longer than the health check interval
    writer.send(("RPUSH", key, "after"))  # raised "Bad response from PING health check" before
    assert writer.ask("LRANGE", key, 0, -1) == [b"before", b"after"]
    quick_health_checks.delete(key)


@pytest.fixture
def reliable_channel(redis_broker: str) -> Iterator[Any]:

    from ordered_tasks.worker.transport.transport import RedisTransport

    with Connection(redis_broker, transport=RedisTransport) as connection:
        channel = connection.channel()
        channel.fetch_reliably()
        yield channel
        channel.close()


def test_an_acknowledgement_redis_refuses_is_sent_again_and_holds_its_partition_meanwhile(
        reliable_channel: Any, caplog: pytest.LogCaptureFixture) -> None:
    from ordered_tasks.worker.unanswered import Unanswered

    channel = reliable_channel
    name = f"q-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, "direct"), routing_key=name)
    producer = channel.connection.client.Producer(channel)
    for body in ("m1", "m2"):
        producer.publish(body, exchange=queue.exchange, routing_key=name, declare=[queue], serializer="json")
    consumer, held, drain = holding_consumer(channel, [queue])
    consumer.consume()
    drain()
    assert [m.payload for m in held] == ["m1"]
    # Redis goes away for the acknowledgements: nothing listens on port 1.
    channel._acks = Unanswered(redis.ConnectionPool.from_url("redis://127.0.0.1:1/0"), "acknowledgements")
    held[0].ack()
    assert "Could not acknowledge message" in caplog.text
    drain()
    assert [m.payload for m in held] == ["m1"]  # the partition waits: m2 is not fetched past m1
    assert channel.qos.in_window[name] == 1  # its place in the window stays taken
    channel._acks = None  # Redis is back
    channel._ack_retry_at = 0.0
    channel.send_unsent_acknowledgements()
    assert "at a later attempt" in caplog.text
    drain()
    assert [m.payload for m in held] == ["m1", "m2"]
    held[1].ack()
    channel.flush_acknowledgements()
    raw = redis.Redis(connection_pool=channel.pool)
    assert not [tag for tag in raw.hkeys(channel.unacked_key)
                if tag.decode() in {m.delivery_tag for m in held}]
    consumer.cancel()


def test_a_partition_keeps_running_after_quiet_spells_longer_than_the_health_check(
        app: Celery, broker: str, start_workers: Any, results: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Bursts separated by quiet spells longer than the Redis health check interval all run."""
    if not broker.startswith("redis"):
        pytest.skip("the health check of kombu's Redis pools")
    monkeypatch.setenv("TEST_HEALTH_CHECK_INTERVAL", "2")  # kombu's default is 25 s
    start_workers(1)
    run = f"quiet-{uuid.uuid4().hex[:6]}"
    task = app.tasks[ORDERED]
    total = 0
    for burst in range(3):
        for n in range(16):
            total += 1
            task.apply_async(kwargs={"run": run, "key": f"k{n % 8}", "seq": total})
        assert wait_done(results, run, total, timeout=20.0) == total, f"burst {burst} stalled"
        time.sleep(3.5)  # quiet: longer than the health check interval (2 s)
    eventually(lambda: int(results.get(f"{run}:done") or 0) == total, timeout=5.0)
