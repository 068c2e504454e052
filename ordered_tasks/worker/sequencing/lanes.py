"""Per-key lanes: the messages of one key start one at a time, in delivery order; other keys run at once."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator

from .claims import Begin, Claim

logger = logging.getLogger(__name__)

#: The lane of a message: its partition and its key, or ``BARRIER`` for a message whose
#: key the consumer cannot tell before it runs (a producer that sent no ``ordered_key``).
BARRIER = None
#: Seconds a key's overflow is not spilled again after a spill failed (its messages run in the lane).
SPILL_PAUSE = 5.0


@dataclass(eq=False)
class Entry:
    """One delivered, unacknowledged message of a lane."""

    tag: Hashable
    partition: int
    key: str | None
    #: Hands the message to Celery (and so to the pool); may be called again to run it again.
    start: Callable[[], Any]
    #: The message itself (for handing it back to the broker).
    message: Any = None
    started: bool = False
    #: A control message (replay, skip, wake-up): it runs in its key's lane, is never spilled,
    #: and a spill may happen while it runs (it works on parked rows, whose order the spill keeps).
    control: bool = False
    #: Whether the message may be parked as it was delivered (not a redelivered copy, which
    #: goes through the guard so that one that already ran is recognised).
    spillable: bool = True
    #: Handed to the spill instead of the pool.
    spilled: bool = False
    #: Lets a spill of its key take it while it only waits in the pool (a pool that runs tasks in
    #: this process); None: once started, it runs.
    claim: Claim | None = None

    @property
    def withdrawn(self) -> bool:
        """Started, then taken by a spill of its key before it began: its task ends once it is parked."""
        return self.claim is not None and self.claim.withdrawn

    def drop_claim(self, settled: bool = False) -> None:
        if self.claim is not None:
            self.claim.drop(settled)


def resolve_claims(entries: list[Entry], outcome: Begin) -> None:
    """The spill that took ``entries`` ended: tell the task of the withdrawn one among them (if any)."""
    for entry in entries:
        if entry.claim is not None:
            entry.claim.resolve(outcome)


@dataclass
class _Partition:
    #: key -> the entry that started and has not settled.
    running: dict[str, Entry] = field(default_factory=dict)
    #: key -> entries delivered after the running one, in delivery order.
    waiting: dict[str, deque[Entry]] = field(default_factory=dict)
    #: A message without a key: it starts once nothing of the partition runs, and
    #: nothing of the partition starts until it settled.
    barrier: Entry | None = None
    #: Entries delivered after the barrier, in delivery order.
    behind: deque[Entry] = field(default_factory=deque)
    #: key -> the entries of the key being parked in one batch (see :meth:`Lanes.spill`).
    spilling: dict[str, list[Entry]] = field(default_factory=dict)
    #: Keys whose spill was parked in this tenure and whose wake-up has not run here since: they
    #: are held, so their later messages are parked as they come (see :meth:`Lanes.spill`).
    parking: set[str] = field(default_factory=set)
    #: Tags of the entries that left the window's count while they wait to be parked.
    released: set[Hashable] = field(default_factory=set)

    def idle(self) -> bool:
        return not self.running and not self.waiting and not self.spilling

    def entries(self) -> Iterator[Entry]:
        yield from self.running.values()
        for waiting in self.waiting.values():
            yield from waiting
        for batch in self.spilling.values():
            yield from batch
        if self.barrier is not None:
            yield self.barrier
        yield from self.behind


class Lanes:
    """The lanes of one consumer channel's partition queues.

    The channel holds a window of unacknowledged messages per partition;
    :meth:`admit` is called for each in delivery order and starts it at
    once unless an earlier message of its key has not settled yet (been
    acknowledged or rejected: it succeeded, was parked, or moved to
    retrying), in which case it waits. :meth:`settled` starts the key's
    next message.

    Messages start on the consumer's event loop only: a settle in a pool
    thread (the threads pool acknowledges there) updates the lanes under
    their lock and hands the start to the loop through ``run_on_loop``.

    ``may_start`` is asked before a waiting message starts: while the
    worker shuts down, nothing more starts and the rest of the window stays
    unacknowledged, to come back in its place.

    A key with ``key_limit`` messages waiting is crowded: with ``spill``
    set, and while no ordinary message of the key runs, its waiting
    messages are handed to ``spill(partition, key, entries)`` in one batch,
    in delivery order, instead of waiting in the window. The spill parks
    them in the database behind the key's earlier parked messages (the key
    is then held until they ran) and acknowledges them; their acknowledgements
    settle them here. Nothing else of the key starts until the batch
    settled; if the spill fails, :meth:`spill_failed` puts the batch back
    at the head of the key's lane. So a hot key holds at most about
    ``key_limit`` messages of the window, and its partition's other keys
    keep running.

    Once a batch of a key is parked, the key is held until its wake-up
    (a control message) ran its parked messages; until a control message
    of the key settles here, every later message of the key is parked as
    it comes rather than started (which would only have the guard park it,
    one transaction per message), in one batch with the others that came
    while the spill before it was stored. A key that went active again
    meanwhile (another worker's or an operator's replay) is held again by
    such a spill and woken: order holds either way.

    With ``release`` set (the Redis fetch, which chooses what it takes),
    the messages of a held key that wait to be parked, and those being
    parked, give their places in the window back, up to ``parking_room``
    of them per partition: the fetch goes on taking the partition's
    messages while a batch is stored, and the next batch holds all that
    came meanwhile. On RabbitMQ the broker's prefetch count is the window,
    and such a key keeps at most ``key_limit`` waiting.
    """

    def __init__(self, may_start: Callable[[], bool] = lambda: True,
                 run_on_loop: Callable[[Callable[[], Any]], None] | None = None,
                 spill: Callable[[int, str, list[Entry]], Any] | None = None, key_limit: int = 0) -> None:
        self.may_start = may_start
        #: Runs a callable on the event loop's thread (now, when called there).
        self.run_on_loop = run_on_loop or (lambda fn: fn())
        self.spill = spill
        self.key_limit = key_limit
        #: Frees the window place of a message that waits to be parked (None: it keeps it).
        self.release: Callable[[Hashable], Any] | None = None
        #: Messages per partition that may wait to be parked outside the window.
        self.parking_room = 0
        self._lock = threading.RLock()
        self._partitions: dict[int, _Partition] = {}
        self._by_tag: dict[Hashable, Entry] = {}
        self._to_start: deque[Entry] = deque()
        self._to_spill: deque[tuple[int, str, list[Entry]]] = deque()
        #: key -> until when (monotonic) it is not spilled again, after a failed spill.
        self._no_spill: dict[str, float] = {}
        #: partition -> tokens of the messages that wait to be admitted later (see :meth:`defer`).
        self._deferred: dict[int, set[object]] = {}
        self._starting = False

    def __len__(self) -> int:
        return len(self._by_tag)

    def admit(self, tag: Hashable, partition: int, key: str | None, start: Callable[[], Any],
              message: Any = None, control: bool = False, spillable: bool = True,
              claim: Claim | None = None, deferred: object | None = None) -> bool:
        """A message of ``partition`` and ``key`` (``BARRIER``: unknown) was delivered.

        ``deferred``: the token :meth:`defer` gave it when it was delivered;
        False (and nothing admitted) if its partition was dropped since.
        """
        entry = Entry(tag, partition, key, start, message, control=control, spillable=spillable, claim=claim)
        with self._lock:
            if deferred is not None:
                pending = self._deferred.get(partition)
                if pending is None or deferred not in pending:
                    return False
                pending.discard(deferred)
            self._by_tag[tag] = entry
            self._place(self._partitions.setdefault(partition, _Partition()), entry)
        self.run_on_loop(self._run)
        return True

    def defer(self, partition: int) -> object:
        """A delivered message of ``partition`` is admitted later (a retry's wake-up waits for its time).

        Returns the token to admit it with. Dropping the partition meanwhile
        cancels it: the message went back to its queue, and its copy may be
        delivered again (on Redis under the same tag) before it would have
        been admitted.
        """
        token = object()
        with self._lock:
            self._deferred.setdefault(partition, set()).add(token)
        return token

    def _place(self, lanes: _Partition, entry: Entry) -> None:
        if lanes.barrier is not None:
            lanes.behind.append(entry)
        elif entry.key is BARRIER:
            lanes.barrier = entry
            if lanes.idle():
                self._to_start.append(entry)
        elif entry.key in lanes.running or entry.key in lanes.spilling:
            lanes.waiting.setdefault(entry.key, deque()).append(entry)
            if entry.key in lanes.parking and entry.spillable and not entry.control:
                self._release(lanes, entry)  # waits for the batch being stored, outside the window
            self._maybe_spill(lanes, entry)
        elif entry.key in lanes.parking and entry.spillable and not entry.control:
            lanes.waiting.setdefault(entry.key, deque()).append(entry)
            self._next(lanes, entry.key, entry)  # parked as it comes (or started, if it cannot be)
        else:
            lanes.running[entry.key] = entry
            self._to_start.append(entry)

    def settled(self, tag: Hashable) -> Entry | None:
        """The message ``tag`` was acknowledged or rejected: start what waited for it.

        Returns its entry, or None for a message that is not (or no longer) in a lane.
        """
        with self._lock:
            entry = self._by_tag.pop(tag, None)
            if entry is None:
                return None
            entry.drop_claim(settled=True)
            lanes = self._partitions.get(entry.partition)
            if lanes is not None:
                lanes.released.discard(tag)
                self._remove(lanes, entry)
            # Most settles free nothing (no later message of the key waits): the loop sleeps on.
            due = bool(self._to_start or self._to_spill)
        if due:
            self.run_on_loop(self._run)
        return entry

    def recall(self, tag: Hashable) -> list[Entry]:
        """The running message ``tag`` goes back to the broker: take its key's waiting messages out too.

        Returns them in delivery order; the caller hands them back before
        ``tag`` (each becomes the new head of the queue on Redis, so the
        last goes first), so that none of them runs before it. Nothing
        starts. Empty for a message that is not running.
        """
        with self._lock:
            entry = self._by_tag.get(tag)
            lanes = self._partitions.get(entry.partition) if entry is not None else None
            if entry is None or lanes is None or not entry.started or entry.key is BARRIER:
                return []
            followers = list(lanes.waiting.pop(entry.key, ()))
            for follower in followers:
                follower.drop_claim()
                self._by_tag.pop(follower.tag, None)
                lanes.released.discard(follower.tag)
            return followers

    def _remove(self, lanes: _Partition, entry: Entry) -> None:
        key = entry.key
        if lanes.barrier is entry:
            lanes.barrier = None
            behind, lanes.behind = lanes.behind, deque()
            for later in behind:
                self._place(lanes, later)
        elif key is not BARRIER and lanes.running.get(key) is entry:
            del lanes.running[key]
            if entry.control:  # its wake-up (or a replay) ran: the key may be active again
                lanes.parking.discard(key)
            self._next(lanes, key, entry)
        elif key is not BARRIER and entry in lanes.spilling.get(key, ()):
            batch = lanes.spilling[key]
            batch.remove(entry)
            if not batch:  # the whole batch is parked: the key is held
                del lanes.spilling[key]
                lanes.parking.add(key)
                self._next(lanes, key, entry)
        else:  # settled before it started (a closed channel, a revoke)
            waiting = lanes.waiting.get(key) if key is not BARRIER else None
            if key is not BARRIER and waiting is not None and entry in waiting:
                waiting.remove(entry)
                if not waiting:
                    del lanes.waiting[key]
            elif entry in lanes.behind:
                lanes.behind.remove(entry)

    def _next(self, lanes: _Partition, key: str, last: Entry) -> None:
        """``last`` of ``key`` settled: spill the key's overflow, or start its next message."""
        running = lanes.running.get(key)
        if running is not None or key in lanes.spilling:
            if running is not None and running.withdrawn and key not in lanes.spilling:
                self._maybe_spill(lanes, last)  # it is parked: what came meanwhile follows it
            return  # a control message still runs: a spill may go on beside it
        waiting = lanes.waiting.get(key)
        if waiting and waiting[0].control:
            # A control message (a wake-up, a replay) first: it starts now, and what came after
            # it may be parked beside it. Were it left waiting while later messages spill, a
            # steady stream of its key would keep it waiting for good.
            control = waiting.popleft()
            if not waiting:
                del lanes.waiting[key]
            lanes.running[key] = control
            self._to_start.append(control)
            self._maybe_spill(lanes, control)
            return
        if self._maybe_spill(lanes, last):
            return
        if waiting:
            following = waiting.popleft()
            if not waiting:
                del lanes.waiting[key]
            lanes.running[key] = following
            self._to_start.append(following)
        elif lanes.barrier is not None and lanes.idle():
            self._to_start.append(lanes.barrier)

    def _maybe_spill(self, lanes: _Partition, entry: Entry) -> bool:
        """Hand the waiting messages of ``entry``'s key to the spill, if the key is crowded.

        Only while no ordinary message of the key runs (a failure of one
        would park it behind the spilled ones), or while the one that was
        started only waits in the pool's queue and its claim lets the spill
        take it (it is then parked first, and its task ends without running
        once it begins; see :mod:`.claims`); only all of its waiting
        ordinary messages at once (so the parked order is the delivery
        order), and only if each of them may be parked as delivered.
        """
        key = entry.key
        if self.spill is None or self.key_limit <= 0 or key is BARRIER or key in lanes.spilling:
            return False
        running = lanes.running.get(key)
        if running is not None and (running.control or running.withdrawn):
            running = None  # a control message runs beside a spill; a withdrawn one is being parked
        if running is not None and (running.claim is None or not running.spillable):
            return False
        # A held key parks whatever waits; another only once it is crowded.
        least = 1 if key in lanes.parking else self.key_limit
        waiting = lanes.waiting.get(key)
        if not waiting or len(waiting) < least:
            return False
        batch = [e for e in waiting if not e.control]
        if len(batch) < least or not all(e.spillable for e in batch):
            return False
        if self._no_spill.get(key, 0.0) > time.monotonic() or not self.may_start():
            return False
        if running is not None and (running.claim is None or not running.claim.withdraw()):
            return False  # it began in the pool: its key's messages wait for it to end
        self._no_spill.pop(key, None)
        rest = deque(e for e in waiting if e.control)
        if rest:
            lanes.waiting[key] = rest
        else:
            del lanes.waiting[key]
        for spilled in batch:
            spilled.spilled = True
            self._release(lanes, spilled)
        lanes.spilling[key] = batch
        # A copy (settles shrink the batch), headed by the withdrawn one, which stays running here
        # until its task ends (its acknowledgement settles it).
        head = [running] if running is not None else []
        self._to_spill.append((entry.partition, key, [*head, *batch]))
        return True

    def _release(self, lanes: _Partition, entry: Entry) -> None:
        """``entry`` waits to be parked: its place in the window is free, if there is parking room."""
        if (self.release is not None and entry.tag not in lanes.released
                and len(lanes.released) < self.parking_room):
            lanes.released.add(entry.tag)
            self.release(entry.tag)

    def spill_failed(self, partition: int, key: str, batch: list[Entry]) -> None:
        """The spill of ``batch`` failed: its messages go back to the head of their lane, in order.

        They then run (or are parked by the guard) one at a time as usual;
        the key is not spilled again for :data:`SPILL_PAUSE` seconds. A
        started message the spill had withdrawn runs after all, as a
        redelivered copy (the spill may have written it before it failed).
        """
        resolve_claims(batch, Begin.CHECK)
        with self._lock:
            lanes = self._partitions.get(partition)
            current = lanes.spilling.get(key) if lanes is not None else None
            if lanes is None or current is None or not all(e in batch for e in current):
                return
            del lanes.spilling[key]
            lanes.parking.discard(key)
            now = time.monotonic()
            if len(self._no_spill) > 1000:  # a long outage: forget the pauses that are over
                self._no_spill = {k: until for k, until in self._no_spill.items() if until > now}
            self._no_spill[key] = now + SPILL_PAUSE
            # Not the withdrawn head: it was started, and stays the key's running message.
            back = [e for e in batch if self._by_tag.get(e.tag) is e and not e.started]
            waiting = lanes.waiting.setdefault(key, deque())
            for entry in reversed(back):
                entry.spilled = False
                waiting.appendleft(entry)
            if not waiting:
                del lanes.waiting[key]
            self._next(lanes, key, batch[0])
        self.run_on_loop(self._run)

    def _hand_to_spill(self, partition: int, key: str, batch: list[Entry]) -> None:
        """Hand ``batch`` to the spill; if that cannot be done (stopping, the pool gone), put it back."""
        try:
            if self.spill is None or not self.may_start():
                raise RuntimeError("the worker is stopping")
            self.spill(partition, key, batch)
        except Exception as exc:
            logger.warning("Could not hand %d messages of key %r to the spill (%r); they stay in the "
                           "window.", len(batch), key, exc)
            self.spill_failed(partition, key, batch)

    def _run(self) -> None:
        """Start the entries due to start, in order (on the loop); re-entrant calls only queue more."""
        if self._starting:
            return
        self._starting = True
        try:
            while True:
                with self._lock:
                    spills, self._to_spill = list(self._to_spill), deque()
                for partition, key, batch in spills:
                    self._hand_to_spill(partition, key, batch)
                with self._lock:
                    if not self._to_start:
                        if self._to_spill:
                            continue
                        return
                    entry = self._to_start.popleft()
                    if entry.started or self._by_tag.get(entry.tag) is not entry:
                        continue
                    if not self.may_start():
                        self._to_start.clear()  # the rest of the window goes back in place
                        return
                    entry.started = True
                entry.start()
        finally:
            self._starting = False

    def is_running(self, tag: Hashable) -> bool:
        """Whether ``tag`` is the started, unsettled message of its lane."""
        with self._lock:
            entry = self._by_tag.get(tag)
            return entry is not None and entry.started and not entry.spilled

    def entry(self, tag: Hashable) -> Entry | None:
        with self._lock:
            return self._by_tag.get(tag)

    def drop_partition(self, partition: int) -> list[Entry]:
        """Forget the lanes of ``partition`` (the worker lost it, or gets it back anew); return its entries.

        Their messages are neither acknowledged nor started here: they go
        back to the queue with the partition (the next owner, or this worker
        in its next tenure, restores them at the head in delivery order).
        """
        with self._lock:
            lanes = self._partitions.pop(partition, None)
            self._deferred.pop(partition, None)
            self._to_spill = deque(spill for spill in self._to_spill if spill[0] != partition)
            if lanes is None:
                return []
            dropped = list(lanes.entries())
            for entry in dropped:
                entry.drop_claim()
                if self._by_tag.get(entry.tag) is entry:
                    del self._by_tag[entry.tag]
            return dropped

    def key_counts(self, partition: int) -> dict[str, int]:
        """The keys of ``partition`` in the window, with their numbers of messages there (all states)."""
        with self._lock:
            lanes = self._partitions.get(partition)
            if lanes is None:
                return {}
            counts = {key: 1 for key in lanes.running if key is not BARRIER}
            for group in (lanes.waiting, lanes.spilling):
                for key, entries in group.items():
                    if key is not BARRIER:
                        counts[key] = counts.get(key, 0) + len(entries)
            return counts

    def parking(self, partition: int) -> tuple[int, list[str]]:
        """The held keys of ``partition`` that park what comes, and how many more may wait outside the window.

        (0, []) when their messages keep their window places (no ``release``).
        """
        with self._lock:
            lanes = self._partitions.get(partition)
            if lanes is None or not lanes.parking or self.release is None or lanes.barrier is not None:
                return 0, []  # behind a barrier nothing is parked: what the fetch took would stay
            # Every message of a parking key that waits or is being stored counts, also one that
            # keeps its window place (a redelivered copy, or one past the room).
            used = sum(len(lanes.waiting.get(key, ())) + len(lanes.spilling.get(key, ()))
                       for key in lanes.parking)
            return max(0, self.parking_room - max(used, len(lanes.released))), sorted(lanes.parking)

    def crowded_keys(self, partition: int, limit: int) -> list[str]:
        """The keys of ``partition`` with ``limit`` or more messages in the window (running and waiting)."""
        with self._lock:
            lanes = self._partitions.get(partition)
            return self._crowded_in(lanes, limit) if lanes is not None else []

    def crowded(self, limit: int) -> dict[int, list[str]]:
        """:meth:`crowded_keys` of every partition that has some (one look, for a fetch of many queues)."""
        with self._lock:
            found = {partition: self._crowded_in(lanes, limit)
                     for partition, lanes in self._partitions.items()
                     if lanes.waiting or lanes.spilling or limit <= 1}
        return {partition: keys for partition, keys in found.items() if keys}

    @staticmethod
    def _crowded_in(lanes: _Partition, limit: int) -> list[str]:
        # A key with nothing waiting or spilling has one message in the window at most.
        keys = {*lanes.running, *lanes.spilling} if limit <= 1 else {*lanes.waiting, *lanes.spilling}
        return [key for key in keys
                if key is not BARRIER and (key in lanes.running) + len(lanes.waiting.get(key, ()))
                + len(lanes.spilling.get(key, ())) >= limit]

    def counts(self) -> dict[int, tuple[int, int]]:
        """Per partition: messages running (started, unsettled) and waiting."""
        with self._lock:
            return {p: (sum(1 for e in lanes.entries() if e.started),
                        sum(1 for e in lanes.entries() if not e.started))
                    for p, lanes in self._partitions.items()}
