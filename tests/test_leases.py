"""Partition leases, restores and requeues at the head, on a real Redis without worker processes."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from queue import Empty
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue

from ordered_tasks.worker.exclusivity.leases import LeaseKeeper, restore_to_head
from tests.conftest import holding_consumer

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_broker: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_broker)
    yield client
    client.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    prefix = f"lease-{uuid.uuid4().hex[:8]}"
    yield prefix
    for key in client.keys(f"ordered_tasks:*:{prefix}.*"):
        client.delete(key)


@pytest.fixture
def channel(redis_broker: str) -> Iterator[Any]:
    from ordered_tasks.worker.transport.transport import RedisTransport

    with Connection(redis_broker, transport=RedisTransport) as connection:
        channel = connection.channel()
        yield channel
        channel.close()


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, "direct"), routing_key=name)


def _publish(channel: Any, queue: Queue, *bodies: str) -> None:
    producer = channel.connection.client.Producer(channel)
    for body in bodies:
        producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                         serializer="json")


def _take(channel: Any, queue: Queue, count: int) -> list[Any]:
    """Take ``count`` messages without acknowledging them, as a consumer that then died."""
    messages = [channel.basic_get(queue.name, no_ack=False) for _ in range(count)]
    assert all(messages)
    return messages


def _unacked(channel: Any, queue: Queue) -> list[str]:
    """The unacknowledged messages of ``queue`` (the hash is shared by every queue)."""
    raw = redis.Redis(connection_pool=channel.pool)
    return [json.loads(record)[0]["body"] for record in raw.hgetall(channel.unacked_key).values()
            if json.loads(record)[2] == queue.name]


def test_leases_go_to_one_keeper_and_move_with_a_higher_fence(client: redis.Redis, prefix: str) -> None:
    owner = LeaseKeeper(client, prefix, [0, 1, 2])
    standby = LeaseKeeper(client, prefix, [0, 1, 2])
    owner.renew()
    standby.renew()
    assert sorted(owner.leases) == [0, 1, 2] and standby.leases == {}
    fences = dict(owner.leases)
    owner.release_all()
    standby.renew()
    assert sorted(standby.leases) == [0, 1, 2]
    assert all(standby.leases[p] > fences[p] for p in fences)
    owner.renew()  # a stopped keeper never takes a lease back
    assert owner.leases == {}
    standby.release_all()


@pytest.mark.django_db
def test_a_fencing_counter_the_coordination_redis_lost_is_raised_past_the_databases(
        client: redis.Redis, prefix: str) -> None:
    """Tokens at or below the database's fence would have every key-state write of the partition
    refused, for good: the keeper raises the counter past it as it takes the lease."""
    from ordered_tasks.models import PartitionFence

    PartitionFence.objects.update_or_create(partition=2, defaults={"fence": 50})
    keeper = LeaseKeeper(client, prefix, [2])
    keeper.renew()
    assert keeper.leases == {2: 51}
    assert int(client.get(keeper.fence_key(2))) == 51
    keeper.release_all()
    keeper = LeaseKeeper(client, prefix, [2])
    keeper.renew()
    assert keeper.leases == {2: 52}  # a counter ahead of the database is used as it is
    keeper.release_all()


def test_restore_puts_a_dead_consumers_messages_back_at_the_head(channel: Any) -> None:
    mine, other = _queue(f"q-{uuid.uuid4().hex[:8]}"), _queue(f"q-{uuid.uuid4().hex[:8]}")
    _publish(channel, mine, "1", "2", "3")
    _publish(channel, other, "x")
    _take(channel, mine, 1)
    _take(channel, other, 1)
    dead = channel.connection.client.channel()  # the next owner's channel, not the one that delivered
    assert restore_to_head(dead, mine.name) == 1
    bodies = [channel.basic_get(mine.name, no_ack=True).payload for _ in range(3)]
    assert bodies == ["1", "2", "3"]
    assert channel.basic_get(other.name) is None  # another partition's message is left alone
    channel.qos.restore_unacked()
    channel.queue_purge(other.name)
    dead.close()


def test_several_restored_messages_keep_the_order_they_were_delivered_in(channel: Any) -> None:
    queue = _queue(f"q-{uuid.uuid4().hex[:8]}")
    _publish(channel, queue, *"123456")
    _take(channel, queue, 5)  # after a reconnect: run, delivered, not yet acknowledged...
    assert restore_to_head(channel, queue.name) == 5
    assert [channel.basic_get(queue.name, no_ack=True).payload for _ in range(6)] == list("123456")


def test_restore_does_not_swallow_a_message_the_consumer_is_waiting_for(channel: Any) -> None:
    """The restore must not use the connection kombu keeps its BRPOP in flight on."""
    waiting, restored = _queue(f"q-{uuid.uuid4().hex[:8]}"), _queue(f"q-{uuid.uuid4().hex[:8]}")
    _publish(channel, restored, "r")
    _take(channel, restored, 1)
    received: list[str] = []
    consumer = Consumer(channel, [waiting], callbacks=[lambda body, message: received.append(body)],
                        accept=["json"])
    consumer.consume()
    cycle = channel.connection.cycle
    cycle.on_poll_start()  # sends BRPOP on channel.client's connection, as the event loop does
    assert channel._in_poll
    _publish(channel, waiting, "w")  # BRPOP pops it: its reply now waits on that connection
    assert restore_to_head(channel, restored.name) == 1
    channel.connection.client.drain_events(timeout=5)
    assert received == ["w"]
    assert channel.basic_get(restored.name, no_ack=True).payload == "r"
    consumer.cancel()



def test_an_acknowledgement_after_the_channel_closed_leaves_the_message_unacknowledged(
        channel: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from kombu.exceptions import OperationalError

    queue = _queue(f"q-{uuid.uuid4().hex[:8]}")
    _publish(channel, queue, "1", "2")
    other = channel.connection.client.channel()
    acked, rejected = _take(other, queue, 2)
    other.close()  # the broker connection was lost; Celery acknowledges afterwards
    errors = (OperationalError,)
    acked.ack_log_error(logging.getLogger("test"), errors)
    rejected.reject_log_error(logging.getLogger("test"), errors, requeue=False)
    assert "Could not acknowledge message" in caplog.text and "Could not reject message" in caplog.text
    assert "its broker connection closed" in caplog.text
    assert restore_to_head(channel, queue.name) == 2  # still there for the next owner
    assert [channel.basic_get(queue.name, no_ack=True).payload for _ in range(2)] == ["1", "2"]


def test_a_requeued_message_goes_back_to_the_head(channel: Any) -> None:

    queue = _queue(f"q-{uuid.uuid4().hex[:8]}")
    _publish(channel, queue, "1", "2", "3")
    Consumer(channel, [queue], accept=["json"])  # declares the queue and its binding
    [message] = _take(channel, queue, 1)
    message.reject(requeue=True)  # Celery's Reject(requeue=True), for one
    assert channel.basic_get(queue.name, no_ack=True).payload == "1"
    assert _unacked(channel, queue) == []
    channel.queue_purge(queue.name)


def test_a_message_popped_for_a_cancelled_consumer_goes_back_to_the_head(channel: Any) -> None:

    queue = _queue(f"q-{uuid.uuid4().hex[:8]}")
    consumer = Consumer(channel, [queue], accept=["json"], callbacks=[lambda body, message: None])
    consumer.consume()
    channel.connection.cycle.on_poll_start()  # BRPOP in flight, as in the event loop
    _publish(channel, queue, "1", "2")  # BRPOP pops "1"
    consumer.cancel()  # lease lost or shutting down, before the reply is read
    channel._brpop_read()  # kombu reads it anyway (also at channel close)
    assert [channel.basic_get(queue.name, no_ack=True).payload for _ in range(2)] == ["1", "2"]


def test_the_reliable_fetch_records_the_message_before_the_reply_travels(channel: Any) -> None:

    channel.fetch_reliably()
    queue = _queue(f"q-{uuid.uuid4().hex[:8]}")
    _publish(channel, queue, "1", "2")
    received: list[str] = []
    while_running: list[list[str]] = []

    def run(body: str, message: Any) -> None:
        received.append(body)
        while_running.append(_unacked(channel, queue))
        message.ack()

    consumer = Consumer(channel, [queue], accept=["json"], callbacks=[run])
    consumer.consume()
    channel.connection.client.drain_events(timeout=5)  # an ordinary delivery and acknowledgement
    assert received == ["1"] and len(while_running[0]) == 1  # recorded by the script alone
    channel.flush_acknowledgements()
    assert _unacked(channel, queue) == []
    channel.connection.cycle.on_poll_start()  # fetches "2"; now the worker or Redis dies
    assert channel._in_poll
    assert channel._size(queue.name) == 0 and len(_unacked(channel, queue)) == 1
    channel.client.connection.disconnect()  # the reply is lost with the connection
    consumer.cancel()
    assert restore_to_head(channel, queue.name) == 1  # so the next owner runs it first
    assert channel.basic_get(queue.name, no_ack=True).payload == "2"


def test_the_reliable_fetch_waits_a_moment_after_finding_nothing(channel: Any) -> None:
    import time

    from ordered_tasks.worker.transport.fetch import IDLE_WAIT

    channel.fetch_reliably()
    queue = _queue(f"q-{uuid.uuid4().hex[:8]}")
    consumer = Consumer(channel, [queue], accept=["json"], callbacks=[lambda body, message: None])
    consumer.consume()
    channel.connection.cycle.on_poll_start()
    with pytest.raises(Empty):  # nothing to fetch
        channel._brpop_read()
    channel._brpop_start()
    assert not channel._in_poll  # nothing sent while waiting
    time.sleep(IDLE_WAIT)
    channel._brpop_start()
    assert channel._in_poll
    consumer.cancel()


def test_the_reliable_fetch_takes_one_message_per_queue_and_acknowledges_without_waiting(
        channel: Any) -> None:

    channel.fetch_reliably()
    first, second = (_queue(f"q-{uuid.uuid4().hex[:8]}") for _ in range(2))
    _publish(channel, first, "a1", "a2", "a3")
    _publish(channel, second, "b1")
    consumer, held, drain = holding_consumer(channel, [first, second])
    consumer.consume()
    drain()
    assert sorted(m.payload for m in held) == ["a1", "b1"]  # not a2: a1 is not acknowledged yet
    assert channel._size(first.name) == 2
    held.pop(0 if held[0].payload == "a1" else 1).ack()
    drain()
    assert sorted(m.payload for m in held) == ["a2", "b1"]
    for message in held:
        message.ack()
    channel.flush_acknowledgements()
    assert _unacked(channel, first) == [] and _unacked(channel, second) == []
    assert channel._size(first.name) == 1
    consumer.cancel()
    channel.queue_purge(first.name)


def test_one_fetch_takes_each_queue_up_to_its_free_places_and_a_takeover_keeps_their_order(
        channel: Any) -> None:
    """A fetch takes several messages at once, each queue up to its free places in the window, each
    recorded with a later delivery time than the one before, so that they come back in order."""
    channel.fetch_reliably(3)
    first, second = (_queue(f"q-{uuid.uuid4().hex[:8]}") for _ in range(2))
    _publish(channel, first, "a1", "a2", "a3", "a4", "a5")
    _publish(channel, second, "b1", "b2")
    consumer, held, _drain = holding_consumer(channel, [first, second])
    consumer.consume()
    channel.connection.cycle.on_poll_start()  # one call of the script
    assert channel._brpop_read()  # its reply hands on every message it took
    by_queue = {q.name: [m.payload for m in held if m.delivery_info["routing_key"] == q.name]
                for q in (first, second)}
    assert by_queue == {first.name: ["a1", "a2", "a3"], second.name: ["b1", "b2"]}
    assert channel._size(first.name) == 2 and channel._size(second.name) == 0
    raw = redis.Redis(connection_pool=channel.pool)
    in_delivery_order = [tag.decode() for tag in raw.zrange(channel.unacked_index_key, 0, -1)
                         if tag.decode() in {m.delivery_tag for m in held}]
    assert in_delivery_order == [m.delivery_tag for m in held]
    channel.connection.cycle.on_poll_start()
    with pytest.raises(Empty):  # the first queue's window is full, the second is empty
        channel._brpop_read()
    consumer.cancel()  # the worker dies: the next owner puts them back at the head, in order
    assert restore_to_head(channel, first.name) == 3
    assert [channel.basic_get(first.name, no_ack=True).payload for _ in range(5)] == [
        "a1", "a2", "a3", "a4", "a5"]
    assert restore_to_head(channel, second.name) == 2
    assert [channel.basic_get(second.name, no_ack=True).payload for _ in range(2)] == ["b1", "b2"]


def test_the_fetch_script_is_sent_once_then_called_by_its_hash_and_sent_again_when_redis_forgot_it(
        channel: Any) -> None:
    from tests.conftest import holding_consumer

    channel.fetch_reliably()
    queue = _queue(f"q-{uuid.uuid4().hex[:8]}")
    _publish(channel, queue, *(str(n) for n in range(1, 8)))
    consumer, held, drain = holding_consumer(channel, [queue])
    consumer.consume()
    drain()
    assert [m.payload for m in held] == ["1"]  # fetched with EVAL: Redis now knows the script
    connection = channel.client.connection
    sent: list[str] = []
    send_command = connection.send_command

    def recording(*args: Any, **kwargs: Any) -> Any:
        sent.append(str(args[0]))
        return send_command(*args, **kwargs)

    connection.send_command = recording
    held.pop().ack()
    drain()
    assert [m.payload for m in held] == ["2"]
    assert sent and set(sent) == {"EVALSHA"}, sent
    # A restarted Redis knows no scripts. Scripts are the server's, so another process using the
    # same script (a test run beside this one) may send it again between the flush and the
    # fetch: then the fetch finds it, and the flush is tried again with the next message.
    for expected in ("3", "4", "5", "6", "7"):
        redis.Redis(connection_pool=channel.pool).script_flush()
        sent.clear()
        held.pop().ack()
        drain()
        assert [m.payload for m in held] == [expected]  # a refused call pops nothing: still in order
        if "EVAL" in sent:
            assert sent[0] == "EVALSHA", sent  # refused by its hash, then the script went again
            break
    else:
        pytest.fail("Redis never refused the script's hash after five flushes")
    held.pop().ack()
    drain()
    while held:
        held.pop().ack()
        drain()
    channel.flush_acknowledgements()
    assert _unacked(channel, queue) == [] and channel._size(queue.name) == 0


def _publish_keyed(channel: Any, queue: Queue, *items: tuple[str, str | None]) -> None:
    """Publish (body, ordered_key) pairs; a key of None sends no key header (another producer)."""
    producer = channel.connection.client.Producer(channel)
    for body, key in items:
        producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                         serializer="json", headers={"ordered_key": key} if key is not None else {})


def test_the_fetch_sets_a_crowded_key_aside_and_takes_it_from_there_in_order(channel: Any) -> None:
    """A key with half of the window in the worker does not hold back the partition's other keys."""
    name, queue, lanes = _crowded_partition(channel, 3, ("h1", "hot"), ("h2", "hot"), ("o1", "other"),
                                            ("h3", "hot"), ("o2", "other"))
    consumer, held, drain = holding_consumer(channel, [queue])
    try:
        consumer.consume()
        drain()
        assert [m.payload for m in held] == ["o1", "o2"]  # past the hot key's messages
        assert _remaining(channel, name) == []
        assert _set_aside(channel, name, "hot") == ["h1", "h2", "h3"]  # in the key's list, in order
        lanes.settled("held-0")  # a place of the hot key's share is free again
        drain()
        assert [m.payload for m in held][2:3] == ["h1"]  # its next message is its first
    finally:
        consumer.cancel()
        _purge_with_aside(channel, name)


def test_the_fetch_takes_a_message_whose_key_it_cannot_read_past_a_crowded_keys(channel: Any) -> None:
    # No key header: the worker reads its key and, were it the hot key's, would move it behind h1
    # before the next fetch (the fetch script's tests show nothing is set aside after it in one call).
    name, queue, _lanes = _crowded_partition(channel, 4, ("h1", "hot"), ("raw", None), ("o1", "other"),
                                             ("h2", "hot"))
    consumer, held, drain = holding_consumer(channel, [queue])
    try:
        consumer.consume()
        drain()
        assert [m.payload for m in held] == ["raw", "o1"]
        assert _set_aside(channel, name, "hot") == ["h1", "h2"]
        assert _remaining(channel, name) == []
    finally:
        consumer.cancel()
        _purge_with_aside(channel, name)


def test_one_fetch_takes_no_more_of_a_key_than_its_share_of_the_window(channel: Any) -> None:
    """Counting what one call takes: a key at the head of a backlog does not fill the window."""
    from ordered_tasks.conf import get_settings
    from ordered_tasks.worker.sequencing.window import fetch_share

    channel.fetch_reliably(16)
    name = f"{get_settings().queue_prefix}.5"
    queue = _queue(name)
    channel.queue_purge(name)
    share = fetch_share(16)  # running and waiting
    _publish_keyed(channel, queue, *[(f"k{n}", "hot") for n in range(20)],
                   *[(f"o{n}", f"other{n}") for n in range(5)])
    consumer, held, _drain = holding_consumer(channel, [queue])
    try:
        consumer.consume()
        channel.connection.cycle.on_poll_start()
        assert channel._brpop_read()
        assert [m.payload for m in held] == [f"k{n}" for n in range(share)] + [f"o{n}" for n in range(5)]
        assert _set_aside(channel, name, "hot") == [f"k{n}" for n in range(share, 20)]  # in order
    finally:
        consumer.cancel()
        _purge_with_aside(channel, name)


def test_a_batch_fetched_for_a_consumer_cancelled_meanwhile_comes_back_in_its_order(channel: Any) -> None:
    """The reply arrives after the queue's consumer was cancelled (a lease lost, a shutdown): its
    messages stay recorded as unacknowledged, and the next tenure restores them in order (kombu would
    requeue each at the head in turn, reversing them)."""
    channel.fetch_reliably(8)
    queue = _queue(f"q-{uuid.uuid4().hex[:8]}")
    _publish(channel, queue, "a1", "a2", "a3", "a4", "a5")
    consumer, held, _drain = holding_consumer(channel, [queue])
    consumer.consume()
    channel.connection.cycle.on_poll_start()  # the script took all five
    assert channel._in_poll
    consumer.cancel()
    assert channel._brpop_read()
    assert held == [] and channel._size(queue.name) == 0 and len(_unacked(channel, queue)) == 5
    assert restore_to_head(channel, queue.name) == 5
    assert [channel.basic_get(queue.name, no_ack=True).payload for _ in range(5)] == [
        "a1", "a2", "a3", "a4", "a5"]


def test_an_item_redis_reads_as_json_and_python_does_not_is_handed_on_raw(channel: Any) -> None:
    """Redis's JSON parser takes a hexadecimal number; Python's does not. The item is handed on as a
    raw message under the tag it was recorded with (the worker parks it as invalid), not raised."""
    channel.fetch_reliably(4)
    queue = _queue(f"q-{uuid.uuid4().hex[:8]}")
    item = ('{"body": "e30=", "content-type": "application/json", "content-encoding": "utf-8", '
            '"headers": {"x": 0x10}, "properties": {"delivery_tag": "odd-1", "body_encoding": "base64", '
            '"delivery_info": {"exchange": "", "routing_key": "QUEUE"}}}').replace("QUEUE", queue.name)
    consumer, held, _drain = holding_consumer(channel, [queue])
    consumer.consume()
    redis.Redis(connection_pool=channel.pool).lpush(queue.name, item)
    channel.connection.cycle.on_poll_start()
    assert channel._brpop_read()
    assert len(held) == 1 and held[0].delivery_tag == "odd-1"
    assert held[0].headers == {"x-ordered-tasks-raw": "hex"}
    assert bytes.fromhex(held[0].body.decode()) == item.encode()
    held[0].ack()
    channel.flush_acknowledgements()
    assert _unacked(channel, queue) == []
    consumer.cancel()


def test_an_acknowledgement_in_a_pool_thread_that_frees_a_full_window_wakes_the_loop(
        channel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every window full no fetch is in flight: the acknowledgement that frees a place wakes
    the event loop, which fetches; one that leaves the window with room does not need to."""
    from ordered_tasks.worker.transport import qos

    woken: list[object] = []
    monkeypatch.setattr(qos.LOOP, "in_loop", lambda: False)  # as in a pool thread
    monkeypatch.setattr(qos.LOOP, "call", woken.append)
    channel.fetch_reliably(2)
    queue = _queue(f"q-{uuid.uuid4().hex[:8]}")
    _publish(channel, queue, "1", "2", "3")
    consumer, held, _drain = holding_consumer(channel, [queue])
    consumer.consume()
    channel.connection.cycle.on_poll_start()
    assert channel._brpop_read() and [m.payload for m in held] == ["1", "2"]  # the window is full
    held[0].ack()
    assert woken == [qos._fetch_again]
    held[1].ack()  # the window had room already
    assert woken == [qos._fetch_again]
    consumer.cancel()
    channel.queue_purge(queue.name)


def _crowded_partition(channel: Any, partition: int, *items: tuple[str, str | None]) -> tuple[str, Queue, Any]:
    """A partition queue holding ``items``, on a channel whose window (16) has the key "hot" crowded."""
    from ordered_tasks.conf import get_settings
    from ordered_tasks.worker.sequencing.window import fetch_share

    channel.fetch_reliably(16)
    name = f"{get_settings().queue_prefix}.{partition}"
    queue = _queue(name)
    channel.queue_purge(name)
    _publish_keyed(channel, queue, *items)
    lanes = channel.lanes
    for n in range(fetch_share(16)):  # the hot key has its share of the window: one runs, the rest wait
        lanes.admit(f"held-{n}", partition, "hot", lambda: None)
    return name, queue, lanes


def _set_aside(channel: Any, name: str, key: str) -> list[str]:
    """The bodies of the messages of ``key`` the fetch set aside from queue ``name``, oldest first."""
    from ordered_tasks.redisscripts import aside_list

    return _remaining(channel, aside_list(name, key))


def _purge_with_aside(channel: Any, name: str) -> None:
    from tests.conftest import drop_set_aside

    channel.queue_purge(name)
    drop_set_aside(redis.Redis(connection_pool=channel.pool), name)


def _remaining(channel: Any, name: str) -> list[str]:
    """The bodies of the messages still in queue ``name``, oldest first (left in place)."""
    raw = redis.Redis(connection_pool=channel.pool)
    return [json.loads(base64.b64decode(json.loads(item)["body"])) for item in reversed(raw.lrange(name, 0, -1))]
