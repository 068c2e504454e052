"""The RabbitMQ channel of ordered workers: one unacknowledged message per partition queue, no cancel."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests.conftest import publish_and_consume

pytestmark = pytest.mark.integration


def partition_queues(count: int) -> list[Queue]:
    """Queues named like partition queues of the test settings (so the channel treats them as such)."""
    from ordered_tasks.conf import get_settings

    prefix = get_settings().queue_prefix
    exchange = Exchange(f"rmq-{uuid.uuid4().hex[:6]}", "direct", auto_delete=True)
    return [Queue(f"{prefix}.{p}", exchange, routing_key=f"k{p}", durable=True,
                  queue_arguments={"x-single-active-consumer": True}) for p in range(count)]


@pytest.fixture
def ordered_connection(rabbitmq: str) -> Iterator[Any]:
    from ordered_tasks.worker.exclusivity.rabbitmq import Transport

    with Connection(rabbitmq, transport=Transport) as connection:
        yield connection


def _drain(connection: Any, seconds: float = 0.5) -> None:
    try:
        while True:
            connection.drain_events(timeout=seconds)
    except TimeoutError:
        pass


def test_celerys_global_prefetch_becomes_a_window_per_partition_queue(
        rabbitmq: str, ordered_connection: Any, settings: Any) -> None:
    settings.ORDERED_TASKS = {**settings.ORDERED_TASKS, "WINDOW": 2}
    channel = ordered_connection.channel()
    queues = [q(channel) for q in partition_queues(2)]
    for queue in queues:
        queue.declare()
        queue.purge()
    try:
        producer = Producer(channel)
        for queue in queues:
            for n in range(4):
                producer.publish({"n": n}, exchange=queue.exchange, routing_key=queue.routing_key,
                                 declare=[queue])
        held: list[Any] = []
        consumer = Consumer(channel, queues, callbacks=[lambda body, message: held.append(message)],
                            accept=["json"])
        channel.basic_qos(0, 1, True)  # what Celery's Tasks step asks for: 1 for the whole channel
        consumer.consume()
        _drain(ordered_connection)
        # Per channel, one message in all; per consumer, a window of two of each partition queue.
        assert sorted(m.delivery_info["routing_key"] for m in held) == ["k0", "k0", "k1", "k1"]
        first = held[0]
        first.ack()
        _drain(ordered_connection)
        assert len(held) == 5  # the acknowledged queue's next message, nothing more
        assert held[4].delivery_info["routing_key"] == first.delivery_info["routing_key"]
    finally:
        channel.close()
        with Connection(rabbitmq) as cleaner:
            for queue in queues:
                queue(cleaner.default_channel).purge()


@pytest.mark.parametrize("transport", ["ordered", "kombu"])
def test_one_drain_hands_on_every_delivery_that_arrived(rabbitmq: str, transport: str) -> None:
    """Celery's loop for green pools drains once per turn: a window must not arrive one message per turn."""
    from ordered_tasks.worker.exclusivity.rabbitmq import Transport

    queue = Queue(f"drain-{uuid.uuid4().hex[:6]}", auto_delete=True)
    with Connection(rabbitmq, transport=Transport if transport == "ordered" else None) as connection:
        channel = connection.channel()
        held: list[Any] = []
        publish_and_consume(channel, queue, ({"n": n} for n in range(10)),
                            lambda body, message: held.append(body["n"]))
        deadline = time.monotonic() + 5
        while not held:  # the first delivery may take a moment to arrive
            assert time.monotonic() < deadline, "nothing was delivered"
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=1)
        time.sleep(0.2)  # the other nine arrive meanwhile
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=1)
        if transport == "ordered":
            assert held == list(range(10))
        else:  # kombu's own transport: one delivery per drain (what the ordered one improves on)
            assert len(held) == 2
        channel.close()


def test_a_partition_queues_consumer_is_not_cancelled_until_the_connection_closes(
        rabbitmq: str, ordered_connection: Any) -> None:
    channel = ordered_connection.channel()
    [queue] = [q(channel) for q in partition_queues(1)]
    queue.declare()
    try:
        consumer = Consumer(channel, [queue], callbacks=[lambda body, message: None], accept=["json"])
        consumer.consume()
        consumer.cancel()  # as Celery's Tasks step does at every stop and shutdown
        with Connection(rabbitmq) as observer:
            assert observer.default_channel.queue_declare(queue.name, passive=True).consumer_count == 1
        other = Queue(f"plain-{uuid.uuid4().hex[:6]}")(channel)
        other.declare()
        plain = Consumer(channel, [other], callbacks=[lambda body, message: None], accept=["json"])
        plain.consume()
        plain.cancel()  # other queues are cancelled as kombu does
        with Connection(rabbitmq) as observer:
            assert observer.default_channel.queue_declare(other.name, passive=True).consumer_count == 0
        other.delete()
    finally:
        channel.close()
    with Connection(rabbitmq) as observer:  # the consumer ends with its channel
        assert observer.default_channel.queue_declare(queue.name, passive=True).consumer_count == 0
        observer.default_channel.queue_delete(queue.name)


def test_the_worker_consumes_with_ordered_tasks_transports() -> None:
    from celery import Celery

    from ordered_tasks.worker.consumer import ordered_transport

    def chosen(url: str) -> str | None:
        return ordered_transport(Celery("t", broker=url, set_as_current=False))

    assert chosen("redis://127.0.0.1:6379/0") == "ordered_tasks.worker.transport.transport:RedisTransport"
    assert chosen("rediss://127.0.0.1:6380/0") == "ordered_tasks.worker.transport.transport:RedisTransport"
    assert chosen("sentinel://127.0.0.1:26379") == "ordered_tasks.worker.transport.transport:SentinelTransport"
    assert chosen("amqp://guest@127.0.0.1//") == "ordered_tasks.worker.exclusivity.rabbitmq:Transport"
    assert chosen("pyamqp://guest@127.0.0.1//") == "ordered_tasks.worker.exclusivity.rabbitmq:Transport"
    assert chosen("amqps://guest@127.0.0.1//") == "ordered_tasks.worker.exclusivity.rabbitmq:SSLTransport"
    assert chosen("memory://") is None


def test_the_ordered_connection_keeps_what_kombu_derived_from_the_url() -> None:
    """TLS of ``rediss://`` and ``amqps://``, alternates of a failover list, the heartbeat."""
    from celery import Celery

    from ordered_tasks.worker.consumer import ordered_connection

    def made(url: str) -> object:
        app = Celery("t", broker=url, set_as_current=False)
        return ordered_connection(app.connection_for_read(heartbeat=10.0), 10.0)

    secure: Any = made("rediss://127.0.0.1:6380/0")
    assert secure.transport_cls == "ordered_tasks.worker.transport.transport:RedisTransport"
    assert secure.ssl, "rediss:// without broker_use_ssl: kombu's TLS default must stay"
    assert secure.heartbeat == 10.0
    plain: Any = made("redis://127.0.0.1:6379/0;redis://127.0.0.1:6390/0")
    assert not plain.ssl and plain.alt == ["redis://127.0.0.1:6379/0", "redis://127.0.0.1:6390/0"]
    tls: Any = made("amqps://guest@127.0.0.1//")
    assert tls.transport_cls == "ordered_tasks.worker.exclusivity.rabbitmq:SSLTransport" and tls.ssl
    memory: Any = made("memory://")
    assert memory.transport_cls == "memory"


def test_a_channel_of_a_lost_connection_starts_nothing_more_from_its_lanes(ordered_connection: Any) -> None:
    """py-amqp marks every channel of a connection it collects closed; the lanes ask the channel."""
    channel = ordered_connection.channel()
    kept = ordered_connection.channel()
    assert channel.lanes.may_start() and kept.lanes.may_start()
    channel.close()
    assert not channel.lanes.may_start() and kept.lanes.may_start()
    ordered_connection.connection.collect()  # what a lost connection goes through
    assert not kept.lanes.may_start()
