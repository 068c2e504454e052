"""The lanes of a consumer's window: one message at a time per key, in delivery order, other keys at once."""

from __future__ import annotations

import functools
import json
import random
import threading
import time
from typing import Any, Callable

import pytest
from kombu.asynchronous import Hub
from kombu.compression import compress
from kombu.message import Message

from ordered_tasks.worker.sequencing.claims import Begin, Claims, runs_in_process
from ordered_tasks.worker.sequencing.handoff import LoopCalls
from ordered_tasks.worker.sequencing.lanes import BARRIER, Lanes, resolve_claims
from ordered_tasks.worker.sequencing.window import lane_key


class Recorder:
    def __init__(self, lanes: Lanes) -> None:
        self.lanes = lanes
        self.started: list[str] = []

    def admit(self, tag: str, key: str | None, partition: int = 0) -> None:
        self.lanes.admit(tag, partition, key, lambda: self.started.append(tag))


@pytest.fixture
def rec() -> Recorder:
    return Recorder(Lanes())


def test_different_keys_start_at_once_and_one_key_waits(rec: Recorder) -> None:
    rec.admit("a1", "a")
    rec.admit("b1", "b")
    rec.admit("a2", "a")
    rec.admit("a3", "a")
    assert rec.started == ["a1", "b1"]
    rec.lanes.settled("b1")
    assert rec.started == ["a1", "b1"]
    rec.lanes.settled("a1")
    assert rec.started == ["a1", "b1", "a2"]
    rec.lanes.settled("a2")
    rec.lanes.settled("a3")
    assert rec.started == ["a1", "b1", "a2", "a3"]
    assert len(rec.lanes) == 0


def test_the_same_key_in_two_partitions_is_two_lanes(rec: Recorder) -> None:
    rec.admit("p0", "a", partition=0)
    rec.admit("p1", "a", partition=1)
    assert rec.started == ["p0", "p1"]


def test_a_message_without_a_key_waits_for_its_partition_and_holds_it(rec: Recorder) -> None:
    rec.admit("a1", "a")
    rec.admit("b1", "b")
    rec.admit("x", BARRIER)
    rec.admit("c1", "c")
    rec.admit("other", "c", partition=1)  # another partition is not held
    assert rec.started == ["a1", "b1", "other"]
    rec.lanes.settled("a1")
    assert "x" not in rec.started
    rec.lanes.settled("b1")
    assert rec.started[-1] == "x"
    assert "c1" not in rec.started
    rec.lanes.settled("x")
    assert rec.started[-1] == "c1"


def test_a_message_settled_before_it_started_is_skipped(rec: Recorder) -> None:
    rec.admit("a1", "a")
    rec.admit("a2", "a")
    rec.admit("a3", "a")
    rec.lanes.settled("a2")  # the channel closed, or it was revoked while waiting
    rec.lanes.settled("a1")
    assert rec.started == ["a1", "a3"]


def test_recall_takes_the_waiting_messages_of_the_key_out(rec: Recorder) -> None:
    rec.admit("a1", "a")
    rec.admit("b1", "b")
    rec.admit("a2", "a")
    rec.admit("a3", "a")
    rec.admit("b2", "b")
    followers = rec.lanes.recall("a1")
    assert [f.tag for f in followers] == ["a2", "a3"]
    rec.lanes.settled("a1")
    assert rec.started == ["a1", "b1"]  # nothing of a started
    assert rec.lanes.recall("b2") == []  # not running: nothing to recall
    rec.admit("a4", "a")
    assert rec.started[-1] == "a4"


def test_dropping_a_partition_starts_nothing_more_of_it(rec: Recorder) -> None:
    rec.admit("a1", "a")
    rec.admit("a2", "a")
    rec.admit("z1", "z", partition=1)
    dropped = rec.lanes.drop_partition(0)
    assert sorted(e.tag for e in dropped) == ["a1", "a2"]
    rec.lanes.settled("a1")  # the running one ends later: nothing follows it
    assert rec.started == ["a1", "z1"]
    assert rec.lanes.entry("z1") is not None


def test_nothing_starts_while_the_worker_stops() -> None:
    running = [True]
    lanes = Lanes(may_start=lambda: running[0])
    rec = Recorder(lanes)
    rec.admit("a1", "a")
    rec.admit("a2", "a")
    rec.admit("b1", "b")
    running[0] = False
    lanes.settled("a1")
    rec.admit("c1", "c")
    assert rec.started == ["a1", "b1"]


def test_a_message_that_settles_as_it_starts_starts_the_next_without_recursion() -> None:
    lanes = Lanes()
    started: list[int] = []

    def start(n: int) -> None:
        started.append(n)
        lanes.settled(n)  # e.g. a revoked message, acknowledged at once

    count = 5000
    lanes.admit(-1, 0, "k", lambda: started.append(-1))
    for n in range(count):
        lanes.admit(n, 0, "k", lambda n=n: start(n))
    lanes.settled(-1)
    assert started == [-1, *range(count)]
    assert len(lanes) == 0


def test_random_interleavings_keep_each_key_in_order_and_alone() -> None:
    rng = random.Random(7)
    for _round in range(200):
        lanes = Lanes()
        running: dict[str, str] = {}
        order: dict[str, list[int]] = {}
        active: list[str] = []

        def start(tag: str, key: str | None, running: dict[str, str] = running,
                  order: dict[str, list[int]] = order, active: list[str] = active) -> None:
            lane = key if key is not BARRIER else "*"
            assert lane not in running, f"{tag} started while {running.get(lane)} of its key runs"
            if key is BARRIER:
                assert not running, "a message without a key started while others ran"
            else:
                assert "*" not in running
            running[lane] = tag
            active.append(tag)
            if key is not BARRIER:
                order.setdefault(key, []).append(int(tag.split(":")[1]))

        delivered = 0
        for _step in range(60):
            if active and rng.random() < 0.5:
                tag = active.pop(rng.randrange(len(active)))
                lane = next(k for k, t in running.items() if t == tag)
                del running[lane]
                lanes.settled(tag)
            else:
                key = rng.choice(["a", "b", "c", BARRIER]) if rng.random() < 0.95 else BARRIER
                tag = f"{key}:{delivered}"
                delivered += 1
                lanes.admit(tag, 0, key, lambda tag=tag, key=key: start(tag, key))
        for key, numbers in order.items():
            assert numbers == sorted(numbers), key


def _run_hub_until(hub: Hub, done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    loop = hub.create_loop()
    while not done():
        assert time.monotonic() < deadline, "the event loop did not run the call"
        next(loop)


def test_a_settle_in_a_pool_thread_starts_the_next_message_on_the_event_loop() -> None:
    hub = Hub()
    calls = LoopCalls()
    calls.attach(hub)
    started_in: list[int] = []
    lanes = Lanes(run_on_loop=calls.call)
    lanes.admit("a1", 0, "a", lambda: None)
    lanes.admit("a2", 0, "a", lambda: started_in.append(threading.get_ident()))
    pool_thread = threading.Thread(target=lanes.settled, args=("a1",))
    pool_thread.start()
    pool_thread.join(5)
    assert started_in == [], "the next message started in the pool thread"
    _run_hub_until(hub, lambda: bool(started_in))
    assert started_in == [threading.get_ident()]
    hub.close()


def test_loop_calls_wake_a_loop_that_waits_on_nothing_else() -> None:
    hub = Hub()
    calls = LoopCalls()
    calls.attach(hub)
    ran: list[int] = []
    threading.Timer(0.2, calls.call, args=(lambda: ran.append(1),)).start()
    # No timer is due in this hub: only the pipe can wake its poll.
    start = time.monotonic()
    _run_hub_until(hub, lambda: bool(ran), timeout=5)
    assert time.monotonic() - start < 2, "the loop slept past the call"
    hub.close()


def test_calls_from_many_threads_all_run_on_the_loop_once() -> None:
    hub = Hub()
    calls = LoopCalls()
    calls.attach(hub)
    ran: list[int] = []
    threads = [threading.Thread(target=lambda n=n: [calls.call(lambda n=n, i=i: ran.append(n * 100 + i))
                                                    for i in range(100)]) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    _run_hub_until(hub, lambda: len(ran) >= 800)
    assert sorted(ran) == sorted(n * 100 + i for n in range(8) for i in range(100))
    hub.close()


def test_a_key_is_crowded_once_it_has_its_share_of_the_window(rec: Recorder) -> None:
    for n in range(3):
        rec.admit(f"a{n}", "a")
    rec.admit("b0", "b")
    rec.admit("x0", BARRIER)  # a message without a key is never a crowded key
    assert rec.lanes.crowded_keys(0, 3) == ["a"]
    assert sorted(rec.lanes.crowded_keys(0, 1)) == ["a", "b"]
    assert rec.lanes.crowded_keys(1, 1) == []  # another partition
    assert rec.lanes.crowded(3) == {0: ["a"]}  # every partition in one look
    assert {p: sorted(keys) for p, keys in rec.lanes.crowded(1).items()} == {0: ["a", "b"]}
    rec.lanes.settled("a0")
    assert rec.lanes.crowded_keys(0, 3) == [] and rec.lanes.crowded(3) == {}


class _Message:
    def __init__(self, task: str, kwargs: dict[str, object], headers: dict[str, object] | None = None,
                 body: bytes | None = None) -> None:
        self.headers = {"task": task, **(headers or {})}
        self.body = body if body is not None else json.dumps([[], kwargs, {}]).encode()
        self.content_type, self.content_encoding = "application/json", "utf-8"


@pytest.mark.django_db
def test_a_message_is_sequenced_by_the_key_of_its_arguments_whatever_its_header_says() -> None:
    from tests.testapp.tasks import ordered_record, plain_record

    app, name = ordered_record.app, ordered_record.name
    args = {"run": "r", "key": "real", "seq": 1}
    assert lane_key(app, _Message(name, args, {"ordered_key": "real"})) == "real"
    assert lane_key(app, _Message(name, args, {"ordered_key": "other"})) == "real"  # parked under "real"
    assert lane_key(app, _Message(name, args)) == "real"  # no header (another producer)
    assert lane_key(app, _Message(name, {"run": "r", "key": 12, "seq": 1})) == "12"  # canonical
    body, kind = compress(json.dumps([[], args, {}]).encode(), "zlib")
    received = Message(body=body, headers={"task": name, "compression": kind},  # kombu decompresses it
                       content_type="application/json", content_encoding="utf-8")
    assert lane_key(app, received) == "real"
    # Keys that cannot be told here: the message runs alone in its partition.
    assert lane_key(app, _Message(name, args, body=b"not json")) is BARRIER
    assert lane_key(app, _Message(name, {"run": "r", "key": None, "seq": 1})) is BARRIER
    assert lane_key(app, _Message("no.such.task", args, {"ordered_key": "real"})) is BARRIER
    assert lane_key(app, _Message(plain_record.name, args, {"ordered_key": "real"})) is BARRIER


class Spilling(Recorder):
    """Lanes with a key limit of 3 whose spills are recorded (and acknowledged by the test)."""

    def __init__(self) -> None:
        super().__init__(Lanes(key_limit=3))
        self.spills: list[tuple[str, list[str]]] = []
        self.batches: list[list[object]] = []
        self.lanes.spill = lambda partition, key, batch: (
            self.spills.append((key, [e.tag for e in batch])), self.batches.append(batch))

    def admit(self, tag: str, key: str | None, partition: int = 0, control: bool = False,
              spillable: bool = True) -> None:
        self.lanes.admit(tag, partition, key, lambda: self.started.append(tag), control=control,
                         spillable=spillable)

    def acknowledge(self, tags: list[str]) -> None:
        for tag in tags:
            self.lanes.settled(tag)

    def hold_a(self) -> None:
        """Key ``a`` spills once (a0 runs, a1..a3 are parked in one batch): it is held from then on."""
        for n in range(4):
            self.admit(f"a{n}", "a")
        self.lanes.settled("a0")
        self.acknowledge(["a1", "a2", "a3"])


def test_a_crowded_key_spills_its_waiting_messages_in_order_once_its_running_one_settled() -> None:
    rec = Spilling()
    for n in range(5):
        rec.admit(f"a{n}", "a")
    rec.admit("b0", "b")
    assert rec.started == ["a0", "b0"] and rec.spills == []  # never beside an ordinary message of the key
    rec.lanes.settled("a0")
    assert rec.spills == [("a", ["a1", "a2", "a3", "a4"])]  # all waiting ones, in delivery order
    assert rec.started == ["a0", "b0"]
    rec.admit("a5", "a")
    rec.admit("b1", "b")
    rec.lanes.settled("b0")
    assert rec.started == ["a0", "b0", "b1"]  # the other key goes on; a5 waits for the batch
    assert rec.lanes.crowded_keys(0, 3) == ["a"]
    rec.acknowledge(["a1", "a2", "a3"])
    assert rec.started == ["a0", "b0", "b1"]
    rec.acknowledge(["a4"])  # the batch is parked and the key held: a5 is parked too, not started
    assert rec.started == ["a0", "b0", "b1"]
    assert rec.spills == [("a", ["a1", "a2", "a3", "a4"]), ("a", ["a5"])]


def test_a_held_key_parks_what_comes_in_batches_until_a_control_message_of_it_settled() -> None:
    rec = Spilling()
    rec.hold_a()  # parked: the key is held
    rec.admit("a4", "a")
    assert rec.spills[-1] == ("a", ["a4"])  # parked as it comes, below the crowded limit
    rec.admit("a5", "a")
    rec.admit("a6", "a")
    assert rec.started == ["a0"] and len(rec.spills) == 2  # they wait for the batch being stored
    rec.acknowledge(["a4"])
    assert rec.spills[-1] == ("a", ["a5", "a6"])  # then go in one batch
    rec.admit("wake", "a", control=True)
    assert rec.started == ["a0"]  # the wake-up waits for the batch being stored
    rec.acknowledge(["a5", "a6"])
    assert rec.started == ["a0", "wake"]
    rec.admit("a7", "a")
    assert rec.spills[-1] == ("a", ["a7"])  # beside the running wake-up, still parked
    rec.acknowledge(["a7"])
    rec.lanes.settled("wake")  # the wake-up ran the parked messages: the key may be active
    rec.admit("a8", "a")
    assert rec.started == ["a0", "wake", "a8"] and len(rec.spills) == 4


def test_a_held_key_whose_spill_failed_or_that_has_a_redelivered_copy_starts_its_messages() -> None:
    rec = Spilling()
    rec.hold_a()
    rec.admit("a4", "a", spillable=False)  # a redelivered copy goes through the guard
    assert rec.started == ["a0", "a4"]
    rec.admit("a5", "a")
    rec.lanes.settled("a4")
    assert rec.spills[-1] == ("a", ["a5"])
    rec.lanes.spill_failed(0, "a", rec.batches[-1])  # the database is away: it runs, and so do later ones
    assert rec.started == ["a0", "a4", "a5"]
    rec.lanes.settled("a5")
    rec.admit("a6", "a")
    assert rec.started == ["a0", "a4", "a5", "a6"] and len(rec.spills) == 2


def test_a_key_spills_beside_its_running_control_message_which_keeps_its_place() -> None:
    rec = Spilling()
    rec.admit("wake", "a", control=True)
    rec.admit("a1", "a")
    rec.admit("a2", "a")
    rec.admit("wake2", "a", control=True)
    assert rec.spills == []
    rec.admit("a3", "a")
    assert rec.spills == [("a", ["a1", "a2", "a3"])]  # while the wake-up drains parked rows
    rec.acknowledge(["a1", "a2", "a3"])
    assert rec.started == ["wake"]
    rec.lanes.settled("wake")
    assert rec.started == ["wake", "wake2"]


def test_a_redelivered_copy_keeps_its_key_from_spilling() -> None:
    rec = Spilling()
    rec.admit("a0", "a")
    rec.admit("a1", "a", spillable=False)
    for n in range(2, 5):
        rec.admit(f"a{n}", "a")
    rec.lanes.settled("a0")
    assert rec.spills == [] and rec.started == ["a0", "a1"]
    rec.lanes.settled("a1")  # the copy went through the guard: the rest may spill now
    assert rec.spills == [("a", ["a2", "a3", "a4"])]


def test_a_failed_spill_puts_its_batch_back_at_the_head_of_the_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    from ordered_tasks.worker.sequencing import lanes as lanes_module

    rec = Spilling()
    for n in range(5):
        rec.admit(f"a{n}", "a")
    rec.lanes.settled("a0")
    batch = rec.batches[0]
    rec.admit("a5", "a")
    rec.lanes.spill_failed(0, "a", batch)  # type: ignore[arg-type]
    assert rec.started == ["a0", "a1"]  # back in order, one at a time
    for n in range(1, 5):
        rec.lanes.settled(f"a{n}")
    assert rec.started == ["a0", "a1", "a2", "a3", "a4", "a5"]
    assert len(rec.spills) == 1  # not spilled again during the pause
    now = time.monotonic()
    monkeypatch.setattr(lanes_module.time, "monotonic", lambda: now + lanes_module.SPILL_PAUSE + 1)
    for n in range(6, 10):
        rec.admit(f"a{n}", "a")
    rec.lanes.settled("a5")
    assert rec.spills[-1] == ("a", ["a6", "a7", "a8", "a9"])


class Handled:
    """Per key, the numbers of the messages started or parked, in that order (the random tests)."""

    def __init__(self) -> None:
        self.numbers: dict[str, list[int]] = {}

    def began(self, tag: str, active: list[str]) -> None:
        key, number = tag.split(":")
        assert not any(t.startswith(f"{key}:") for t in active), f"{tag} beside another of its key"
        active.append(tag)
        self.numbers.setdefault(key, []).append(int(number))

    def parked(self, batch: list[Any]) -> None:
        for entry in batch:
            self.numbers.setdefault(str(entry.key), []).append(int(str(entry.tag).split(":")[1]))

    def put_back(self, batch: list[Any]) -> None:
        for entry in batch:
            self.numbers[str(entry.key)].pop()

    def assert_in_order(self) -> None:
        for key, numbers in self.numbers.items():
            assert numbers == sorted(numbers), (key, numbers)


def record_spills(rec: Spilling, active: list[str]) -> None:
    """``rec``'s spills are kept for the test to settle, and none may come beside a running message of its key."""

    def spill(partition: int, key: str, batch: list[Any]) -> None:
        assert not any(t.startswith(f"{key}:") for t in active), f"{key} spilled beside a running one"
        rec.batches.append(batch)

    rec.lanes.spill = spill


def test_random_interleavings_with_spills_keep_each_key_in_order() -> None:
    """Messages run or are parked; per key, what ran before a spill was delivered before it, and
    what is parked keeps the delivery order, as the drain will run it."""
    rng = random.Random(11)
    for _round in range(200):
        rec = Spilling()
        handled = Handled()
        active: list[str] = []
        record_spills(rec, active)
        delivered = 0
        for _step in range(80):
            roll = rng.random()
            if rec.batches and roll < 0.2:
                batch = rec.batches.pop(0)
                handled.parked(batch)
                if rng.random() < 0.8:
                    rec.acknowledge([str(e.tag) for e in batch])
                else:  # put back: the same messages are handled again
                    handled.put_back(batch)
                    rec.lanes.spill_failed(0, str(batch[0].key), batch)
            elif active and roll < 0.6:
                tag = active.pop(rng.randrange(len(active)))
                rec.lanes.settled(tag)
            else:
                key = rng.choice(["a", "a", "a", "b"])
                tag = f"{key}:{delivered}"
                delivered += 1
                rec.lanes.admit(tag, 0, key, lambda tag=tag, h=handled, a=active: h.began(tag, a))
        handled.assert_in_order()


def test_a_held_keys_messages_waiting_to_be_parked_leave_the_window_up_to_the_parking_room() -> None:
    rec = Spilling()
    released: list[object] = []
    rec.lanes.release = released.append
    rec.lanes.parking_room = 3
    for n in range(4):
        rec.admit(f"a{n}", "a")
    assert rec.lanes.parking(0) == (0, [])  # not held yet
    rec.lanes.settled("a0")
    assert released == ["a1", "a2", "a3"]  # the first batch, handed to the spill
    rec.acknowledge(["a1", "a2", "a3"])
    assert rec.lanes.parking(0) == (3, ["a"])  # held: the fetch may take three more outside the window
    for n in range(4, 9):
        rec.admit(f"a{n}", "a")
    # a4 is being parked; a5..a8 wait for it: the room holds three of them outside the window.
    assert released == ["a1", "a2", "a3", "a4", "a5", "a6"]
    assert rec.lanes.parking(0) == (0, ["a"])
    rec.acknowledge(["a4"])
    assert rec.spills[-1] == ("a", ["a5", "a6", "a7", "a8"])  # one batch, in delivery order
    assert released[-1] == "a7" and "a8" not in released  # the room is full: a8 keeps its place
    rec.acknowledge(["a5", "a6", "a7", "a8"])
    assert rec.lanes.parking(0) == (3, ["a"]) and rec.started == ["a0"]


def test_without_release_a_held_key_keeps_its_window_places() -> None:
    rec = Spilling()
    rec.hold_a()
    assert rec.lanes.parking(0) == (0, [])  # RabbitMQ: the prefetch count is the window


def test_a_wake_up_waiting_behind_a_batch_starts_when_it_settles_however_many_more_came() -> None:
    rec = Spilling()
    rec.hold_a()  # held: the key parks what comes
    rec.admit("a4", "a")  # being parked
    rec.admit("wake", "a", control=True)
    rec.admit("a5", "a")  # a steady stream: something always waits when a batch settles
    rec.acknowledge(["a4"])
    assert rec.started == ["a0", "wake"]  # the wake-up starts, not another batch ahead of it
    assert rec.spills[-1] == ("a", ["a5"])  # what came after it is parked beside it


def test_the_parking_room_counts_every_waiting_message_and_is_closed_behind_a_barrier() -> None:
    rec = Spilling()
    rec.lanes.release = lambda tag: None
    rec.lanes.parking_room = 10
    rec.hold_a()
    rec.admit("a4", "a")
    rec.admit("a5", "a", spillable=False)  # a redelivered copy keeps its window place
    assert rec.lanes.parking(0) == (8, ["a"])  # both count against the room
    rec.admit("x", None)  # a message whose key is unknown: nothing is parked behind it
    assert rec.lanes.parking(0) == (0, [])


class _Timer:
    def __init__(self) -> None:
        self.due: list[Any] = []

    def call_after(self, _seconds: float, fn: Any, *_args: Any, **_kwargs: Any) -> None:
        self.due.append(fn)


@pytest.mark.parametrize("answer", [False, True])
def test_a_message_whose_join_redis_did_not_answer_holds_its_key_until_it_answers(answer: bool) -> None:
    """A message without a key header: whether it goes behind its key's messages set aside is asked
    again before it starts; meanwhile its key's later messages wait behind it."""
    from types import SimpleNamespace

    from ordered_tasks.worker.sequencing.window import _joining_first

    lanes, started, answers = Lanes(), [], [None, answer]
    consumer = SimpleNamespace(timer=_Timer())
    message = SimpleNamespace(delivery_tag="foreign")
    first = _joining_first(consumer, lanes, message, "k", lambda _m, _k: answers.pop(0),
                           lambda: started.append("foreign"))
    lanes.admit("foreign", 0, "k", first)
    lanes.admit("later", 0, "k", lambda: started.append("later"))
    assert started == [] and len(consumer.timer.due) == 1  # asked once, no answer: it waits
    consumer.timer.due.pop()()
    if answer:  # it went behind its key's messages set aside: the key's next message goes on
        assert started == ["later"]
    else:
        assert started == ["foreign"]
        first()  # run again (a hand-back in place): no second question
        assert started == ["foreign", "foreign"] and answers == []
        lanes.settled("foreign")
        assert started == ["foreign", "foreign", "later"]


def test_a_join_still_unanswered_when_its_partition_moves_on_is_not_asked_again() -> None:
    from types import SimpleNamespace

    from ordered_tasks.worker.sequencing.window import _joining_first

    lanes, asked = Lanes(), []
    consumer = SimpleNamespace(timer=_Timer())
    message = SimpleNamespace(delivery_tag="foreign")
    first = _joining_first(consumer, lanes, message, "k", lambda _m, _k: asked.append(1),
                           lambda: pytest.fail("started"))
    lanes.admit("foreign", 0, "k", first)
    assert asked == [1] and len(consumer.timer.due) == 1
    lanes.drop_partition(0)  # a new tenure put it back at the head of its queue
    consumer.timer.due.pop()()
    assert asked == [1] and consumer.timer.due == []


class _Request:
    def __init__(self, task_id: str) -> None:
        self.id = task_id
        self.name = "t"


def test_a_copy_of_a_task_still_running_in_this_worker_or_waiting_in_its_pool_is_recognised() -> None:
    """A worker frozen past its lease that gets it back fetches again what it held, while the task
    it had handed to its pool may still run there, or not have begun yet (a pool's queue): the copy
    is handed back in place until it ended."""
    from types import SimpleNamespace

    from celery.worker import state

    from ordered_tasks.worker.consumer import _still_running_here

    waiting, running = _Request("task-1"), _Request("task-2")
    state.task_reserved(waiting)  # handed to the pool, not begun
    state.task_reserved(running)
    state.task_accepted(running)
    try:
        assert _still_running_here(SimpleNamespace(headers={"id": "task-1"}))
        assert _still_running_here(SimpleNamespace(headers={"id": "task-2"}))
        assert not _still_running_here(SimpleNamespace(headers={"id": "task-3"}))
        assert not _still_running_here(SimpleNamespace(headers=None))
        state.task_ready(waiting)
        assert not _still_running_here(SimpleNamespace(headers={"id": "task-1"}))
    finally:
        state.task_ready(waiting)
        state.task_ready(running)


def test_a_deferred_message_is_not_admitted_once_its_partition_was_dropped() -> None:
    """A retry's wake-up waits for its time outside the lanes; if its partition went back to its queue
    meanwhile, its copy may be delivered again (on Redis under the same tag) and it is not admitted."""
    lanes, started = Lanes(), []
    stale = lanes.defer(0)
    lanes.drop_partition(0)  # a new tenure: what the worker held went back to the queue
    fresh = lanes.defer(0)  # the copy, delivered again, waits for its time too
    assert not lanes.admit("w", 0, "k", lambda: started.append("stale"), control=True, deferred=stale)
    assert started == [] and lanes.entry("w") is None
    assert lanes.admit("w", 0, "k", lambda: started.append("copy"), control=True, deferred=fresh)
    assert started == ["copy"]
    assert not lanes.admit("w", 0, "k", lambda: started.append("twice"), control=True, deferred=fresh)
    other = lanes.defer(1)
    lanes.drop_partition(0)  # another partition's deferred messages stay
    assert lanes.admit("v", 1, "j", lambda: started.append("other"), control=True, deferred=other)
    assert started == ["copy", "other"]


def test_a_wake_up_that_comes_due_after_its_partition_moved_on_is_dropped() -> None:
    """The window's side: a control message with a future ``eta`` is admitted by the consumer's timer,
    only if its partition was not dropped meanwhile."""
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    from ordered_tasks.worker.sequencing.window import admit
    from tests.testapp.celery import app

    app.finalize(auto=True)
    eta = (datetime.now(timezone.utc) + timedelta(seconds=30)).isoformat()
    for dropped in (False, True):
        lanes, started = Lanes(), []
        consumer = SimpleNamespace(app=app, timer=_Timer())
        message = SimpleNamespace(headers={"task": "ordered_tasks.control", "ordered_key": "k", "eta": eta,
                                           "id": "wake"}, delivery_tag="t", channel=SimpleNamespace(lanes=lanes))
        assert admit(consumer, message, 3, functools.partial(started.append, "wake"))
        assert started == [] and lanes.entry("t") is None and len(consumer.timer.due) == 1
        if dropped:
            lanes.drop_partition(3)
        consumer.timer.due.pop()()
        assert started == ([] if dropped else ["wake"])


def test_a_message_handed_back_in_place_does_not_start_a_copy_that_took_its_tag() -> None:
    """On Redis a copy restored in a new tenure keeps its delivery tag: the pause of the message handed
    back before must not start the copy a second time."""
    from types import SimpleNamespace

    from ordered_tasks.worker.sequencing.window import hand_back_in_place

    lanes, started = Lanes(), []
    consumer = SimpleNamespace(timer=_Timer())
    message = SimpleNamespace(headers={"id": "m"}, delivery_tag="t", channel=SimpleNamespace(lanes=lanes))
    lanes.admit("t", 0, "k", lambda: started.append("first"), message)
    assert hand_back_in_place(consumer, message) and len(consumer.timer.due) == 1
    lanes.drop_partition(0)
    lanes.admit("t", 0, "k", lambda: started.append("copy"), message)  # delivered again, started
    consumer.timer.due.pop()()
    assert started == ["first", "copy"]
    lanes.drop_partition(0)
    lanes.admit("t", 0, "k", lambda: started.append("again"), message)
    assert hand_back_in_place(consumer, message)
    consumer.timer.due.pop()()  # its own entry: it runs again in place
    assert started == ["first", "copy", "again", "again"]


class Claiming(Spilling):
    """Spilling lanes whose messages carry claims, as with a pool that runs tasks in this process."""

    def __init__(self) -> None:
        super().__init__()
        self.claims = Claims()
        self.claims.enabled = True

    def admit(self, tag: str, key: str | None, partition: int = 0, control: bool = False,
              spillable: bool = True) -> None:
        claim = self.claims.new(tag) if spillable and not control else None
        self.lanes.admit(tag, partition, key, lambda: self.started.append(tag), control=control,
                         spillable=spillable, claim=claim)


def test_a_crowded_key_takes_its_started_message_that_has_not_begun_and_parks_it_first() -> None:
    rec = Claiming()
    for n in range(4):
        rec.admit(f"a{n}", "a")
    assert rec.started == ["a0"]  # started: it waits in the pool's queue, not begun
    assert rec.spills == [("a", ["a0", "a1", "a2", "a3"])]  # taken back, at the head of the batch
    assert rec.lanes.is_running("a0") and rec.lanes.entry("a0").withdrawn  # type: ignore[union-attr]
    rec.admit("a4", "a")
    assert len(rec.spills) == 1  # the batch is being stored: a4 waits for it
    for entry in rec.batches[0]:
        if entry.claim is not None:  # type: ignore[attr-defined]
            entry.claim.resolve(Begin.PARKED)  # type: ignore[attr-defined]
    assert rec.claims.begin("a0") is Begin.PARKED  # its task ends without running
    rec.acknowledge(["a1", "a2", "a3"])  # the spill acknowledges the waiting ones only
    assert rec.spills[-1] == ("a", ["a4"])  # the key is held: parked as it comes, behind a0
    rec.lanes.settled("a0")  # its task ended: acknowledged
    rec.acknowledge(["a4"])
    rec.admit("wake", "a", control=True)
    assert rec.started == ["a0", "wake"]
    assert len(rec.claims) == 0  # every claim forgotten once its message began or settled


def test_a_started_message_that_began_in_the_pool_is_not_taken_back() -> None:
    rec = Claiming()
    rec.admit("a0", "a")
    assert rec.claims.begin("a0") is Begin.RUN
    for n in range(1, 5):
        rec.admit(f"a{n}", "a")
    assert rec.spills == []  # its key's messages wait for it, as without claims
    rec.lanes.settled("a0")
    assert rec.spills == [("a", ["a1", "a2", "a3", "a4"])]


def test_a_message_without_a_claim_or_not_spillable_is_not_taken_back() -> None:
    rec = Claiming()
    rec.lanes.admit("a0", 0, "a", lambda: rec.started.append("a0"))  # a pool in another process
    for n in range(1, 4):
        rec.admit(f"a{n}", "a")
    assert rec.spills == []
    rec.admit("b0", "b", spillable=False)  # a redelivered copy goes through the guard
    for n in range(1, 4):
        rec.admit(f"b{n}", "b")
    assert rec.spills == []


def test_a_failed_spill_lets_its_taken_message_run_as_a_redelivered_copy_ahead_of_the_batch() -> None:
    rec = Claiming()
    for n in range(4):
        rec.admit(f"a{n}", "a")
    assert rec.spills == [("a", ["a0", "a1", "a2", "a3"])]
    rec.lanes.spill_failed(0, "a", rec.batches[0])  # type: ignore[arg-type]
    assert rec.claims.begin("a0") is Begin.CHECK  # it runs, once the guard asked whether it was parked
    assert rec.started == ["a0"]  # the batch waits behind it, not beside it
    assert not rec.lanes.entry("a0").withdrawn  # type: ignore[union-attr]
    rec.admit("a4", "a")
    assert len(rec.spills) == 1  # it is the key's running message again, and began: no spill
    for n in range(5):
        rec.lanes.settled(f"a{n}")
    assert rec.started == ["a0", "a1", "a2", "a3", "a4"]


def test_a_taken_message_whose_partition_was_dropped_still_learns_how_its_spill_went() -> None:
    rec = Claiming()
    for n in range(4):
        rec.admit(f"a{n}", "a")
    rec.lanes.drop_partition(0)
    assert len(rec.claims) == 1  # only the taken one: its task must learn the spill's outcome
    rec.lanes.spill_failed(0, "a", rec.batches[0])  # the new tenure: nothing was written
    assert rec.claims.begin("a0") is Begin.CHECK and len(rec.claims) == 0


def test_random_interleavings_with_taken_back_messages_keep_each_key_in_order() -> None:
    """As the test above, with claims: a started message that has not begun may head a batch.

    Per key, what ran or was parked keeps the delivery order, and nothing
    runs beside another of its key, whichever of the pool and the spill takes
    a started message first."""
    rng = random.Random(23)
    taken_back = 0
    for _round in range(300):
        rec = Claiming()
        handled = Handled()
        queued: list[str] = []  # started, not begun
        active: list[str] = []  # begun (running in the pool)
        parked_heads: list[str] = []  # began, found themselves parked: acknowledged by their task
        record_spills(rec, active)
        delivered = 0
        for _step in range(100):
            roll = rng.random()
            if rec.batches and roll < 0.15:
                batch = rec.batches.pop(0)
                handled.parked(batch)
                ok = rng.random() < 0.8
                resolve_claims(batch, Begin.PARKED if ok else Begin.CHECK)
                if ok:
                    taken_back += any(e.started for e in batch)
                    rec.acknowledge([str(e.tag) for e in batch if not e.started])
                else:
                    handled.put_back(batch)
                    rec.lanes.spill_failed(0, str(batch[0].key), batch)
            elif queued and roll < 0.45:  # the pool begins a started message
                tag = queued.pop(rng.randrange(len(queued)))
                entry = rec.lanes.entry(tag)
                if entry is not None and entry.withdrawn and entry.claim is not None \
                        and entry.claim._outcome is None:
                    queued.append(tag)  # its task would wait for the spill: begin it later
                    continue
                begin = rec.claims.begin(tag)
                if begin is Begin.PARKED:
                    parked_heads.append(tag)
                    continue
                handled.began(tag, active)
            elif (active or parked_heads) and roll < 0.7:
                pool = active if active and (not parked_heads or rng.random() < 0.7) else parked_heads
                rec.lanes.settled(pool.pop(rng.randrange(len(pool))))
            else:
                key = rng.choice(["a", "a", "a", "b"])
                tag = f"{key}:{delivered}"
                delivered += 1
                rec.lanes.admit(tag, 0, key, lambda tag=tag, q=queued: q.append(tag), claim=rec.claims.new(tag))
        handled.assert_in_order()
    assert taken_back > 50  # the interleavings did take started messages back


def test_claims_are_made_only_when_enabled_and_once_per_task_id() -> None:
    claims = Claims()
    assert claims.new("t1") is None  # a pool in another process: its tasks cannot see a claim
    claims.enabled = True
    assert claims.new("t1") is not None
    assert claims.new("t1") is None  # a second message of the same id is never taken back
    assert claims.new(None) is None and claims.new("") is None
    assert claims.begin("unknown") is Begin.RUN


def test_a_task_taken_back_waits_for_its_spill_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    from ordered_tasks.worker.sequencing import claims as claims_module

    monkeypatch.setattr(claims_module, "OUTCOME_WAIT", 0.05)  # says so every 0.05 s while it waits
    claims = Claims()
    claims.enabled = True
    claim = claims.new("t1")
    assert claim is not None and claim.withdraw()
    assert not claim.withdraw()
    got: list[Begin] = []
    thread = threading.Thread(target=lambda: got.append(claims.begin("t1")))
    thread.start()
    time.sleep(0.2)
    assert got == []  # the spill has not ended
    claim.resolve(Begin.PARKED)
    claim.resolve(Begin.CHECK)  # a second outcome changes nothing
    thread.join(5)
    assert got == [Begin.PARKED] and claim.withdrawn


def test_only_pools_that_run_tasks_in_this_process_get_claims() -> None:
    from celery.concurrency.prefork import TaskPool as Prefork
    from celery.concurrency.solo import TaskPool as Solo
    from celery.concurrency.thread import TaskPool as Threads

    assert runs_in_process(Threads.__new__(Threads)) and runs_in_process(Solo.__new__(Solo))
    assert not runs_in_process(Prefork.__new__(Prefork)) and not runs_in_process(None)


def test_nothing_more_starts_from_the_lanes_of_a_channel_that_closed() -> None:
    from ordered_tasks.worker.sequencing.window import new_lanes

    channel_open = [True]
    lanes = new_lanes(open_=lambda: channel_open[0])
    started: list[str] = []
    for tag in ("a0", "a1", "b0"):
        lanes.admit(tag, 0, tag[0], lambda tag=tag: started.append(tag))
    assert started == ["a0", "b0"]
    channel_open[0] = False  # the connection was lost: RabbitMQ gave a1 back to the queue
    lanes.settled("a0")  # a task that ran on when the connection went
    assert started == ["a0", "b0"]
    lanes.admit("c0", 0, "c", lambda: started.append("c0"))
    assert started == ["a0", "b0"]


def test_a_message_of_another_key_with_the_same_task_id_does_not_take_the_claim() -> None:
    claims = Claims()
    claims.enabled = True
    claim = claims.new("t1", "a")
    assert claim is not None and claim.withdraw()
    claim.resolve(Begin.PARKED)
    assert claims.begin("t1", "b") is Begin.RUN  # another producer reused the id: it runs
    assert len(claims) == 1  # the claim waits for its own message
    assert claims.begin("t1", "a") is Begin.PARKED and len(claims) == 0
