"""The Redis fetch script against a real Redis: shares per key, messages set aside, and a held key's parking room."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from ordered_tasks.redisscripts import ASIDE_PREFIX, aside_index, aside_list
from ordered_tasks.worker.transport.fetch import _FETCH
from tests.conftest import drop_set_aside


@pytest.fixture
def client(redis_broker: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_broker, decode_responses=True)
    yield connection
    connection.close()


def _message(queue: str, key: str | None, tag: str) -> dict[str, Any]:
    """A kombu message of ``queue`` with ``key`` as its ``ordered_key`` (None: no such header)."""
    return {"body": "", "headers": {} if key is None else {"ordered_key": key},
            "properties": {"delivery_tag": tag, "delivery_info": {"exchange": "", "routing_key": queue}}}


def _queue(client: redis.Redis, keys: list[str]) -> tuple[str, list[str]]:
    """A queue holding one kombu message per entry of ``keys`` (its ``ordered_key``), head first."""
    queue = f"test.fetch.{uuid.uuid4().hex}"
    tags = []
    for n, key in enumerate(keys):
        tag = f"{queue}-{n}"
        tags.append(tag)
        client.lpush(queue, json.dumps(_message(queue, key, tag)))  # consumers pop from the right: the head
    return queue, tags


def _put_aside(client: redis.Redis, queue: str, key: str, tag: str) -> None:
    """A message of ``key`` that a worker set aside from ``queue``, at the tail of the key's list."""
    client.lpush(aside_list(queue, key), json.dumps(_message(queue, key, tag)))
    client.sadd(aside_index(queue), key)


def _fetch(client: redis.Redis, queue: str, *, free: int, share: int, counts: dict[str, int],
           parking: dict[str, object] | None = None, most: int = 64) -> list[str]:
    unacked, index = f"{queue}.unacked", f"{queue}.index"
    reply = client.eval(_FETCH, 3, queue, unacked, index, "1000.0", "base", most, share, queue,
                        json.dumps(counts) if counts else "", free,
                        json.dumps(parking) if parking else "", ASIDE_PREFIX)
    taken = [reply[i + 1] for i in range(0, len(reply or []), 3)]
    assert client.hlen(unacked) == len(taken)  # each one recorded as unacknowledged
    client.delete(unacked, index)
    return taken


def _tags(client: redis.Redis, name: str) -> list[str]:
    """The delivery tags of the messages in list ``name``, head first."""
    return [json.loads(m)["properties"]["delivery_tag"] for m in reversed(client.lrange(name, 0, -1))]


def _clean(client: redis.Redis, queue: str) -> None:
    client.delete(queue)
    drop_set_aside(client, queue)


def test_a_crowded_key_is_set_aside_and_its_messages_stay_in_order(client: redis.Redis) -> None:
    queue, tags = _queue(client, ["h", "h", "h", "o", "h", "p"])
    taken = _fetch(client, queue, free=4, share=2, counts={"h": 1})
    assert taken == [tags[0], tags[3], tags[5]]  # one more h (its share), then the others behind
    assert client.llen(queue) == 0  # nothing of the queue is left to look through again
    assert client.smembers(aside_index(queue)) == {"h"}
    assert _tags(client, aside_list(queue, "h")) == [tags[1], tags[2], tags[4]]
    # h has room again (its message in the window finished): it is served from its list first,
    # in order, before the queue's later messages of h.
    client.lpush(queue, json.dumps(_message(queue, "h", "late-h")))
    assert _fetch(client, queue, free=4, share=2, counts={}) == [tags[1], tags[2]]
    assert _tags(client, aside_list(queue, "h")) == [tags[4], "late-h"]  # late h went behind them
    assert _fetch(client, queue, free=4, share=2, counts={}) == [tags[4], "late-h"]
    assert not client.exists(aside_list(queue, "h")) and not client.exists(aside_index(queue))
    _clean(client, queue)


def test_with_the_window_full_what_is_looked_past_stays_in_place(client: redis.Redis) -> None:
    queue, tags = _queue(client, ["h", "o", "o", "h"])
    _put_aside(client, queue, "o", "early-o")
    # No free place: h is looked past (only parking key p may be taken), and so is everything after
    # it, o's too: set aside, they would be served ahead of h.
    assert _fetch(client, queue, free=0, share=2, counts={"o": 2}, parking={"room": 4, "keys": ["p"]}) == []
    assert _tags(client, queue) == tags
    assert _tags(client, aside_list(queue, "o")) == ["early-o"]
    _clean(client, queue)


def test_nothing_is_set_aside_past_a_message_left_in_place(client: redis.Redis) -> None:
    """What waits aside stays older than the queue: served first, it never overtakes another key."""
    queue, tags = _queue(client, ["a", "o", "a", "p"])
    _put_aside(client, queue, "a", "early-a")
    # a has its share; no free place: the head a goes aside behind its list, o is looked past (only
    # parking key p may be taken), so the a after o stays in place rather than go aside ahead of o.
    taken = _fetch(client, queue, free=0, share=1, counts={"a": 1}, parking={"room": 4, "keys": ["p"]})
    assert taken == [tags[3]]
    assert _tags(client, aside_list(queue, "a")) == ["early-a", tags[0]]
    assert _tags(client, queue) == [tags[1], tags[2]]
    _clean(client, queue)


def test_a_parking_key_is_taken_outside_the_window_while_its_room_lasts(client: redis.Redis) -> None:
    queue, tags = _queue(client, ["h"] * 6 + ["o", "h", "p"])
    taken = _fetch(client, queue, free=1, share=2, counts={"h": 2}, parking={"room": 4, "keys": ["h"]})
    # Four h without a window place, then h is crowded and set aside; o takes the one free place,
    # and p finds none.
    assert taken == [tags[0], tags[1], tags[2], tags[3], tags[6]]
    assert _tags(client, queue) == [tags[7], tags[8]]
    assert _tags(client, aside_list(queue, "h")) == [tags[4], tags[5]]
    # While h parks with room, its messages set aside are taken first, outside the window.
    taken = _fetch(client, queue, free=0, share=2, counts={"h": 2}, parking={"room": 2, "keys": ["h"]})
    assert taken == [tags[4], tags[5]]
    _clean(client, queue)


def test_with_no_free_place_only_a_parking_key_is_taken(client: redis.Redis) -> None:
    queue, tags = _queue(client, ["o", "h", "h"])
    taken = _fetch(client, queue, free=0, share=2, counts={}, parking={"room": 8, "keys": ["h"]})
    assert taken == [tags[1], tags[2]]  # o keeps its place at the head
    client.delete(queue)


def _unkeyed(client: redis.Redis, queue: str, index: int) -> None:
    """Drop the ``ordered_key`` header of the message at ``index`` (0: the tail) of ``queue``."""
    unkeyed = json.loads(client.lindex(queue, index))
    del unkeyed["headers"]["ordered_key"]
    client.lset(queue, index, json.dumps(unkeyed))


def test_a_message_without_a_key_stops_the_look_once_something_was_passed(client: redis.Redis) -> None:
    queue, tags = _queue(client, ["o", "?", "p"])
    _unkeyed(client, queue, 1)
    taken = _fetch(client, queue, free=0, share=2, counts={}, parking={"room": 4, "keys": ["p"]})
    assert taken == []  # o is looked past; the message after it may be o's: nothing further is taken
    assert _tags(client, queue) == tags
    _clean(client, queue)


def test_nothing_is_set_aside_after_a_message_without_a_key(client: redis.Redis) -> None:
    queue, tags = _queue(client, ["h", "?", "o", "h", "p"])
    _unkeyed(client, queue, 3)
    taken = _fetch(client, queue, free=8, share=1, counts={"h": 1})
    # h is set aside before it; it is taken (the worker puts it behind h's list if it is h's), and
    # the look ends at the next h, which might otherwise go aside ahead of it.
    assert taken == [tags[1], tags[2]]
    assert _tags(client, aside_list(queue, "h")) == [tags[0]]
    assert _tags(client, queue) == [tags[3], tags[4]]
    _clean(client, queue)


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


def test_a_message_put_back_goes_before_its_keys_messages_set_aside(redis_broker: str, client: redis.Redis) -> None:
    """A takeover or a requeue in place puts a message back before the later ones of its key."""
    from kombu import Connection

    queue, tags = _queue(client, ["o"])
    _put_aside(client, queue, "h", "later-h")
    unacked, index = f"{queue}.unacked", f"{queue}.index"
    options = {"unacked_key": unacked, "unacked_index_key": index}
    with Connection(redis_broker, transport="ordered_tasks.worker.transport.transport:RedisTransport",
                    transport_options=options) as conn:
        channel = conn.default_channel  # a takeover restores before the channel fetches
        for tag, key in (("early-h", "h"), ("early-k", "k")):
            client.hset(unacked, tag, json.dumps([_message(queue, key, tag), "", queue]))
            client.zadd(index, {tag: 1.0})
            channel.qos.restore_by_tag(tag, leftmost=False)
    assert _tags(client, aside_list(queue, "h")) == ["early-h", "later-h"]
    assert _tags(client, queue) == ["early-k", tags[0]]  # k has nothing set aside: the queue's head
    assert json.loads(client.lindex(queue, -1))["headers"]["redelivered"] is True
    assert client.hlen(unacked) == 0 and client.zcard(index) == 0
    _clean(client, queue)


def test_the_queue_figures_count_the_messages_set_aside(redis_broker: str, client: redis.Redis) -> None:
    import time

    from ordered_tasks.brokerstats import queue_figures
    from ordered_tasks.options import PUBLISHED_HEADER

    prefix = f"test.figures.{uuid.uuid4().hex}"
    queue = f"{prefix}.0"
    now = time.time()
    client.lpush(queue, json.dumps({"headers": {PUBLISHED_HEADER: now - 5}}))
    for age in (100, 90):  # the key's older messages wait aside, its head the oldest
        client.lpush(aside_list(queue, "h"), json.dumps({"headers": {PUBLISHED_HEADER: now - age}}))
    client.sadd(aside_index(queue), "h")
    figures = queue_figures(redis_broker, prefix, 2)
    assert figures[0].depth == 3 and figures[0].oldest_age is not None and figures[0].oldest_age >= 100
    assert figures[1].depth == 0 and figures[1].oldest_age is None
    _clean(client, queue)


def test_a_message_without_a_key_header_goes_behind_its_keys_messages_set_aside(
        redis_broker: str, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker reads its key from its arguments; the fetch may have taken it past older ones."""
    from kombu import Connection

    queue = _queue(client, [])[0]
    _put_aside(client, queue, "h", "older-h")
    unacked, index = f"{queue}.unacked", f"{queue}.index"
    with Connection(redis_broker, transport="ordered_tasks.worker.transport.transport:RedisTransport",
                    transport_options={"unacked_key": unacked, "unacked_index_key": index}) as conn:
        channel = conn.default_channel
        channel.fetch_reliably(16)
        delivered = {}
        for tag in ("foreign-h", "foreign-k"):
            payload = _message(queue, None, tag)
            client.hset(unacked, tag, json.dumps([payload, "", queue]))
            client.zadd(index, {tag: 1.0})
            delivered[tag] = channel.Message(payload, channel=channel)
            channel.qos.append(delivered[tag], tag)
        assert channel.join_set_aside(delivered["foreign-k"], "k") is False  # k has nothing aside
        assert channel.qos.in_window[queue] == 2
        # Its record names its key now: put back, it goes where its key's messages go.
        assert json.loads(client.hget(unacked, "foreign-k"))[0]["headers"]["ordered_key"] == "k"

        def unanswered(*_args: object, **_kwargs: object) -> None:
            raise redis.ConnectionError("Redis went away")

        other = channel.Message(_message(queue, None, "foreign-j"), channel=channel)
        with monkeypatch.context() as patch:
            patch.setattr(channel, "conn_or_acquire", unanswered)
            assert channel.join_set_aside(delivered["foreign-h"], "h") is None
            assert channel.join_set_aside(other, "j") is None
        assert queue in channel._joining  # nothing of the queue is fetched, nor set aside, meanwhile
        assert channel.join_set_aside(other, "j") is True  # no record: not this worker's any more
        assert queue in channel._joining  # foreign-h still waits for its answer
        assert channel.join_set_aside(delivered["foreign-h"], "h") is True
        assert queue not in channel._joining
    assert _tags(client, aside_list(queue, "h")) == ["older-h", "foreign-h"]
    # With its key as its header: when it comes back from the list, it is not moved again.
    assert json.loads(client.lindex(aside_list(queue, "h"), 0))["headers"]["ordered_key"] == "h"
    assert not client.hexists(unacked, "foreign-h") and client.zscore(index, "foreign-h") is None
    assert channel.qos.in_window[queue] == 1  # it left the window
    client.delete(unacked, index)
    _clean(client, queue)
