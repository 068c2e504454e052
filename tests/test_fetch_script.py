"""The Redis fetch script against a real Redis: shares per key, looking past, and a held key's parking room."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis

from ordered_tasks.worker.transport.fetch import _FETCH


@pytest.fixture
def client(redis_broker: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_broker, decode_responses=True)
    yield connection
    connection.close()


def _queue(client: redis.Redis, keys: list[str]) -> tuple[str, list[str]]:
    """A queue holding one kombu message per entry of ``keys`` (its ``ordered_key``), head first."""
    queue = f"test.fetch.{uuid.uuid4().hex}"
    tags = []
    for n, key in enumerate(keys):
        tag = f"{queue}-{n}"
        tags.append(tag)
        message = {"body": "", "headers": {"ordered_key": key},
                   "properties": {"delivery_tag": tag,
                                  "delivery_info": {"exchange": "", "routing_key": queue}}}
        client.lpush(queue, json.dumps(message))  # consumers pop from the right: the head
    return queue, tags


def _fetch(client: redis.Redis, queue: str, *, free: int, share: int, counts: dict[str, int],
           parking: dict[str, object] | None = None, most: int = 64) -> list[str]:
    unacked, index = f"{queue}.unacked", f"{queue}.index"
    reply = client.eval(_FETCH, 3, queue, unacked, index, "1000.0", "base", most, share, queue,
                        json.dumps(counts) if counts else "", free,
                        json.dumps(parking) if parking else "")
    taken = [reply[i + 1] for i in range(0, len(reply or []), 3)]
    assert client.hlen(unacked) == len(taken)  # each one recorded as unacknowledged
    client.delete(unacked, index)
    return taken


def test_a_crowded_key_is_looked_past_and_its_messages_stay_in_order(client: redis.Redis) -> None:
    queue, tags = _queue(client, ["h", "h", "h", "o", "h", "p"])
    taken = _fetch(client, queue, free=4, share=2, counts={"h": 1})
    assert taken == [tags[0], tags[3], tags[5]]  # one more h (its share), then past the others
    assert [json.loads(m)["properties"]["delivery_tag"] for m in reversed(client.lrange(queue, 0, -1))] == [
        tags[1], tags[2], tags[4]]
    client.delete(queue)


def test_a_parking_key_is_taken_outside_the_window_while_its_room_lasts(client: redis.Redis) -> None:
    queue, tags = _queue(client, ["h"] * 6 + ["o", "h", "p"])
    taken = _fetch(client, queue, free=1, share=2, counts={"h": 2}, parking={"room": 4, "keys": ["h"]})
    # Four h without a window place, then h is crowded and looked past; o takes the one free place,
    # and p finds none.
    assert taken == [tags[0], tags[1], tags[2], tags[3], tags[6]]
    assert len(client.lrange(queue, 0, -1)) == 4
    client.delete(queue)


def test_with_no_free_place_only_a_parking_key_is_taken(client: redis.Redis) -> None:
    queue, tags = _queue(client, ["o", "h", "h"])
    taken = _fetch(client, queue, free=0, share=2, counts={}, parking={"room": 8, "keys": ["h"]})
    assert taken == [tags[1], tags[2]]  # o keeps its place at the head
    client.delete(queue)


def test_a_message_without_a_key_stops_the_look_once_something_was_passed(client: redis.Redis) -> None:
    queue, _tags = _queue(client, ["h", "?", "o"])
    unkeyed = json.loads(client.lindex(queue, 1))
    del unkeyed["headers"]["ordered_key"]
    client.lset(queue, 1, json.dumps(unkeyed))
    taken = _fetch(client, queue, free=3, share=1, counts={"h": 1})
    assert taken == []  # h is crowded; the message after it may be h's: nothing further is taken
    client.delete(queue)


class _Message:
    def __init__(self, queue: str) -> None:
        self.delivery_info = {"routing_key": queue}


def test_messages_waiting_to_be_parked_do_not_count_against_the_prefetch_limit() -> None:
    from ordered_tasks.worker.transport.qos import HeadQoS

    channel = type("Channel", (), {"fetches_reliably": True, "connection": object()})()
    qos = HeadQoS(channel, prefetch_count=2)
    for tag in ("a", "b", "c"):
        qos.append(_Message("q"), tag)
    assert qos.in_window["q"] == 3 and not qos.can_consume()
    qos.park_outside("a")
    qos.park_outside("b")  # a hot key's messages waiting for their batch: outside the window
    assert qos.in_window["q"] == 1 and qos.can_consume()
    qos.hold("c")  # a retry's wake-up waiting for its time still counts, as in kombu
    assert qos.in_window["q"] == 0 and qos.can_consume()
    qos.append(_Message("q"), "d")
    assert not qos.can_consume()
    qos.acknowledged("a")
    qos.forget_queue("q")  # a new tenure: what the channel held of the queue went back to it
    assert qos.in_window["q"] == 0 and qos.can_consume()
    assert qos._held == {} and qos._parking == {} and qos._placed == {}
