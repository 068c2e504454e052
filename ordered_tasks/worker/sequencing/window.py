"""A partition consumer's window: every delivered message enters its key's lane, and the lane starts it."""

from __future__ import annotations

import functools
import logging
from datetime import datetime, timezone
from typing import Any, Callable

from celery.worker import state
from kombu.message import Message
from kombu.serialization import loads, prepare_accept_content

from ...conf import get_settings
from ...options import KEY_HEADER, PARTITION_HEADER
from ...routing import key_spec_for
from ..delivery import key_of_partition
from .claims import CLAIMS
from .handoff import LOOP
from .lanes import BARRIER, Entry, Lanes

logger = logging.getLogger(__name__)

#: Seconds before a message handed back in place runs again.
RERUN_PAUSE = 0.5
#: Seconds between two attempts to tell whether a message without a key header must wait behind
#: its key's messages set aside (Redis did not answer).
JOIN_RETRY = 1.0


def key_limit(window: int) -> int:
    """Messages one key may have waiting in a partition's window: half of it (at least one).

    The other half stays open to the partition's other keys, so that a hot
    key does not hold them back: a key with this many waiting has them
    parked in one batch (see :func:`spill_at`). On Redis a key never gets
    there: the fetch sets its later messages aside in Redis (see
    :func:`fetch_share`).
    """
    return max(1, window // 2)


def fetch_share(window: int) -> int:
    """Messages one key may have in a partition's window on Redis, running and waiting: :func:`key_limit`.

    The fetch moves a key's later messages to the key's own list in Redis
    while it has this many in the window, and takes them from there in
    their order once it has room (see :mod:`..transport.fetch`). One fewer
    than what makes a key spill, so that a key that is only busy (a hot
    account) never goes through the database: its backlog stays in the
    broker, and its partition's other keys behind it are fetched.
    """
    return key_limit(window)


#: A key's waiting messages are spilled only in batches of at least this many: below, a
#: burst of one account's events would go through the database for nothing.
MIN_SPILL = 4


def parking_room(window: int) -> int:
    """Messages of held keys that may wait to be parked outside a partition's window (Redis): 16 windows.

    They are parked in one batch per database transaction, so the more come
    while one batch is stored, the fewer transactions a hot key costs; this
    bounds what a worker holds in memory per partition.
    """
    return 16 * window


def spill_at(window: int) -> int:
    """How many waiting messages make a key spill; 0 (never) for a window under ``2 * MIN_SPILL``."""
    limit = key_limit(window)
    return limit if limit >= MIN_SPILL else 0


class SpillTo:
    """Where the lanes hand a crowded key's waiting messages: set by the consumer, whose pool parks them."""

    handler: Callable[[Lanes, int, str, list[Entry]], Any] | None = None

    def __call__(self, lanes: Lanes, partition: int, key: str, batch: list[Entry]) -> None:
        handler = self.handler
        if handler is None:  # no consumer (yet): the messages stay in their lane
            lanes.spill_failed(partition, key, batch)
        else:
            handler(lanes, partition, key, batch)


#: The spill of this process's lanes.
SPILL = SpillTo()


def worker_running() -> bool:
    """Whether the worker still starts messages (not shutting down)."""
    return not (state.should_stop or state.should_terminate)


def new_lanes(open_: Callable[[], bool] | None = None) -> Lanes:
    """The lanes of one channel: messages start on the event loop, and not once the worker shuts down.

    Nor once ``open_`` (the channel) says False: the broker has given the
    channel's unacknowledged messages back to their queue, and another
    consumer may be running them. A key's waiting messages beyond its share
    of the window are spilled (parked) through :data:`SPILL`.
    """
    may_start = worker_running if open_ is None else (lambda: worker_running() and open_())
    lanes = Lanes(may_start=may_start, run_on_loop=LOOP.call, key_limit=spill_at(get_settings().window))
    lanes.spill = functools.partial(SPILL, lanes)
    return lanes


def lanes_of(message: Any) -> Lanes | None:
    """The lanes of the channel that delivered ``message`` (None: not one of ordered_tasks' channels)."""
    return getattr(getattr(message, "channel", None), "lanes", None)


def lane_key(app: Any, message: Any) -> str | None:
    """The key a message is sequenced by: its task's key, from its arguments; else ``BARRIER``.

    The arguments rather than the ``ordered_key`` header, because the guard
    parks a message whose header disagrees with them under the key of its
    arguments (a producer in another language may get the header wrong), and
    that key's later messages must not start before it. Decoding the
    arguments costs about 10 µs per message. A control message (replay,
    skip, wake-up) goes by its header. A message whose key cannot be told
    here (no such task, not an ordered task, a body that does not decode, an
    invalid key) may belong to any key of its partition: it starts once
    nothing else of the partition runs, and nothing starts before it
    settled; the guard or the consumer then parks it.
    """
    headers = message.headers if isinstance(message.headers, dict) else {}
    name = headers.get("task")
    task = app.tasks.get(name) if isinstance(name, str) else None
    if task is None or not isinstance(name, str):
        return BARRIER
    if getattr(task, "ordered_control", False):
        key = headers.get(KEY_HEADER)
        return BARRIER if key is None else str(key)
    spec = key_spec_for(app, name, task)
    if spec is None:
        return BARRIER
    try:
        args, kwargs, _embed = _payload(app, message)
        return spec.canonical(args, kwargs)
    except Exception:  # undecodable, or no valid key: parked when it runs
        return BARRIER


def _payload(app: Any, message: Any) -> Any:
    """The decoded body; a kombu message keeps it, and Celery's request then reads it from there.

    kombu's ``Message`` decompressed the body of a compressed one (Celery's
    ``task_compression``) and decodes with the consumer's accepted content
    types, as Celery does.
    """
    if isinstance(message, Message):
        return message.decode()
    return loads(message.body, message.content_type, message.content_encoding,
                 accept=_accept(app.conf.accept_content))


def _accept(content_types: Any) -> Any:
    """Celery's ``accept_content`` as kombu's ``loads`` takes it (prepared once per setting)."""
    return _prepared(tuple(content_types) if content_types is not None else None)


@functools.lru_cache(maxsize=8)
def _prepared(content_types: tuple[str, ...] | None) -> Any:
    return prepare_accept_content(content_types)


def seconds_to_eta(message: Any) -> float:
    """Seconds until the message's ``eta`` header (0 without one, or when it is due)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    eta = headers.get("eta")
    if not isinstance(eta, str):
        return 0.0
    try:
        when = datetime.fromisoformat(eta)
    except ValueError:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def is_control(app: Any, message: Any) -> bool:
    """Whether ``message`` is one of ordered_tasks' control messages (replay, skip, wake-up)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task = app.tasks.get(headers.get("task")) if isinstance(headers.get("task"), str) else None
    return bool(getattr(task, "ordered_control", False))


def spillable(message: Any, partition: int, key: str | None) -> bool:
    """Whether ``message`` may be parked as it was delivered, should its key be crowded.

    Not a redelivered copy (the guard recognises one that already ran), and
    only a message whose headers agree with its key and queue (the guard
    parks a misfit with its reason).
    """
    if key is BARRIER:
        return False
    info = getattr(message, "delivery_info", None) or {}
    headers = message.headers if isinstance(message.headers, dict) else {}
    if info.get("redelivered") or headers.get("redelivered"):
        return False
    header_partition = headers.get(PARTITION_HEADER)
    if header_partition != partition or isinstance(header_partition, bool):
        return False
    return key_of_partition(headers.get(KEY_HEADER), partition) == key


def admit(consumer: Any, message: Any, partition: int, start: Callable[[], Any]) -> bool:
    """Put a delivered message of ``partition`` into its lane; False when its channel has no lanes.

    A retry's wake-up waits for its time outside the lanes, so that its key's
    later messages are parked meanwhile instead of waiting in the window;
    when it is due it joins its key's lane like any other message. A message
    without a key header (another producer) whose key has messages set aside
    in Redis goes behind them instead (see ``ReliableChannel.join_set_aside``).
    """
    lanes = lanes_of(message)
    if lanes is None:
        return False
    tag, key = message.delivery_tag, lane_key(consumer.app, message)
    control = is_control(consumer.app, message)
    delay = seconds_to_eta(message) if key is not BARRIER else 0.0
    if delay > 0 and control:
        release = getattr(getattr(message.channel, "qos", None), "hold", None)
        if release is not None:
            release(tag)  # Redis: its slot in the window is free until it is due
        waiting = lanes.defer(partition)

        def due() -> None:
            if not lanes.admit(tag, partition, key, start, message, control=True, spillable=False,
                               deferred=waiting):
                logger.info("Control message %s came due after its partition went back to its queue; it "
                            "comes back with the partition.", _task_id(message))

        consumer.timer.call_after(delay, due, priority=6)
        return True
    headers = message.headers if isinstance(message.headers, dict) else {}
    if not control and key is not BARRIER and not isinstance(headers.get(KEY_HEADER), str):
        join = getattr(getattr(message, "channel", None), "join_set_aside", None)
        if join is not None:
            joined = join(message, key)
            if joined:
                return True  # it waits in Redis behind its key's messages set aside
            if joined is None:  # Redis did not answer: it takes its place, and asks again before it starts
                start = _joining_first(consumer, lanes, message, key, join, start)
    may_spill = not control and spillable(message, partition, key)
    lanes.admit(tag, partition, key, start, message, control=control, spillable=may_spill,
                claim=CLAIMS.new(headers.get("id"), key) if may_spill else None)
    return True


def _joining_first(consumer: Any, lanes: Lanes, message: Any, key: str,
                   join: Callable[[Any, str], bool | None], start: Callable[[], Any]) -> Callable[[], Any]:
    """``start``, once Redis told whether the message must go behind its key's messages set aside.

    Until then its queue is not fetched (see ``ReliableChannel.join_set_aside``),
    so nothing newer of its key is set aside meanwhile, and its place in its
    key's lane holds back the key's later messages in the window. Asked
    again every :data:`JOIN_RETRY` seconds; once answered, later calls start
    it straight away (a hand-back in place runs it again).
    """
    answered = False

    def first_join() -> Any:
        nonlocal answered
        if answered:
            return start()
        entry = lanes.entry(message.delivery_tag)
        if entry is None or entry.start is not first_join:
            return None  # its partition moved on (a new tenure put it back): not this worker's any more
        joined = join(message, key)
        if joined is None:
            consumer.timer.call_after(JOIN_RETRY, first_join, priority=6)
            return None
        answered = True
        if joined:  # it left the window, unacknowledged by nobody: its key's next message goes on
            lanes.settled(message.delivery_tag)
            return None
        return start()

    return first_join


def hand_back_in_place(consumer: Any, message: Any) -> bool:
    """Run a message that cannot finish now again after a pause, in its place; False if it is not in a lane.

    The message stays unacknowledged and heads its key's lane, so nothing
    later of its key starts meanwhile, and nothing of the partition goes
    back to the broker (where a message fetched meanwhile could overtake
    it). If the worker lost the partition before then, or shuts down, the
    message is left to come back in its place with the partition.
    """
    lanes = lanes_of(message)
    tag = getattr(message, "delivery_tag", None)
    timer = getattr(consumer, "timer", None)
    if lanes is None or timer is None or not lanes.is_running(tag):
        return False
    handed_back = lanes.entry(tag)

    def again() -> None:
        entry = lanes.entry(tag)
        # Not another entry of the same tag: on Redis a copy restored in a new tenure keeps it.
        if entry is None or entry is not handed_back or not entry.started:
            logger.warning("Message %s was handed back in place, and its partition has moved on since; "
                           "it comes back with the partition.", _task_id(message))
            return
        if lanes.may_start():  # not once the worker stops, or the channel closed
            entry.start()

    logger.warning("Handing message %s back in place: it runs again in %.1f s, before any later "
                   "message of its key.", _task_id(message), RERUN_PAUSE)
    # Called in a pool thread with the threads pool: the timer belongs to the event loop.
    LOOP.call(lambda: timer.call_after(RERUN_PAUSE, again, priority=6))
    return True


def _task_id(message: Any) -> str:
    headers = message.headers if isinstance(message.headers, dict) else {}
    return str(headers.get("id") or getattr(message, "delivery_tag", "?"))
