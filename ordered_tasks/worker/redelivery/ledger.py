"""The messages each partition completed recently, kept in Redis to recognise redelivered copies."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import redis

from ...conf import get_settings
from ...coordination import coordination_client
from ...partitioning import queue_name
from ..unanswered import Unanswered

logger = logging.getLogger(__name__)

#: How many completed task ids each partition remembers (at least; more with a large
#: ``WINDOW``: four windows, since that many messages may come back after a crash).
LEDGER_SIZE = 1000
#: The set is trimmed back to ``LEDGER_SIZE`` every this many writes of a process.
TRIM_EVERY = 64


#: The process whose consumer sends the acknowledgements of the tasks it runs itself
#: (threads, solo and green pools): its completions wait for the next acknowledgement.
_ACKNOWLEDGES_HERE = 0


def acknowledged_here() -> None:
    """Called by the consumer: the tasks it runs in its own process are acknowledged here.

    Their completions are then sent by :func:`flush_completions`, before each acknowledgement.
    """
    global _ACKNOWLEDGES_HERE
    _ACKNOWLEDGES_HERE = os.getpid()


class Ledger:
    """Per partition, the ids of the last tasks completed on its consumer (:data:`LEDGER_SIZE` or more).

    Usually a redelivered copy of a completed task is the partition's very
    last one (its worker died before acknowledging it), but an
    acknowledgement lost with a broker connection can bring a copy back
    some messages later; a sorted set by completion time covers both.
    """

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.writes = 0
        self.writer = Unanswered(client.connection_pool, "the completion ledger")
        self.size = max(LEDGER_SIZE, 4 * get_settings().window)
        #: Completions noted in the consumer's process and not sent yet, and how many were
        #: noted and sent in all (a flush sends everything noted before it).
        self._pending: list[tuple[Any, ...]] = []
        self._noted = 0
        self._sent = 0
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()

    def _key(self, partition: int) -> str:
        return f"ordered_tasks:completed:{queue_name(self.prefix, partition)}"

    def flush(self) -> None:
        """Send the noted completions, then read the replies of the writes sent so far."""
        self.send_noted()
        self.writer.flush()

    def record(self, partition: int, task_id: str) -> None:
        """Note that ``task_id`` completed; a failure is logged.

        In a prefork pool process the command is sent at once, without
        waiting for its reply (replies are read in batches, see
        :class:`Unanswered`): the write has left the process before the task
        returns and the consumer's process acknowledges it. Where the
        consumer runs the task in its own process (threads, solo and green
        pools), the completion is noted, and the next acknowledgement sent in
        the process sends every noted completion first, in one write
        (:func:`flush_completions`): the record still precedes the
        acknowledgement, and 32 threads no longer take turns at a socket for
        every task (a fifth of the throughput of a threads worker).
        """
        key = self._key(partition)
        self.writes += 1
        commands: list[tuple[Any, ...]] = [("ZADD", key, time.time(), task_id)]
        if self.writes % TRIM_EVERY == 0:
            commands.append(("ZREMRANGEBYRANK", key, 0, -self.size - 1))
        if os.getpid() == _ACKNOWLEDGES_HERE:
            with self._pending_lock:
                self._pending.extend(commands)
                self._noted += 1
            return
        try:
            self.writer.send(*commands)
        except redis.RedisError as exc:
            logger.warning("Could not record completion of %s: %r", task_id, exc)

    def send_noted(self) -> None:
        """Send the completions noted so far; returns once they (and those noted before) have left.

        A thread whose completion another thread is sending waits for that send.
        """
        if self._sent >= self._noted or os.getpid() != _ACKNOWLEDGES_HERE:
            return
        with self._flush_lock:
            with self._pending_lock:
                commands, self._pending = self._pending, []
                noted = self._noted
            try:
                if commands:
                    self.writer.send(*commands)
            except redis.RedisError as exc:
                logger.warning("Could not record the completion of %d tasks: %r", noted - self._sent, exc)
            finally:
                self._sent = noted

    def completed(self, partition: int, task_id: str) -> bool:
        """Whether ``task_id`` is among the tasks ``partition`` completed recently."""
        try:
            self.send_noted()
            return self.writer.ask("ZSCORE", self._key(partition), task_id) is not None
        except redis.RedisError as exc:
            logger.warning("Could not read the completion ledger: %r", exc)
            return False


_LEDGERS: dict[tuple[int, str], Ledger | None] = {}
#: Pool threads ask at once: a second ledger made by a racing thread would replace the
#: first, and the first client's collection closes connections still in use.
_LEDGERS_LOCK = threading.Lock()


def _after_fork() -> None:
    global _LEDGERS_LOCK
    _LEDGERS_LOCK = threading.Lock()  # never inherit one held by another thread at the fork


os.register_at_fork(after_in_child=_after_fork)


def ledger_for(app: Any) -> Ledger | None:
    """The ledger of this process, or None when no Redis is configured or available."""
    conf = get_settings()
    key = (id(app), conf.queue_prefix)
    if key in _LEDGERS:  # asked for every task: no lock once it exists
        return _LEDGERS[key]
    with _LEDGERS_LOCK:
        if key not in _LEDGERS:
            client = coordination_client(app)
            _LEDGERS[key] = Ledger(client, conf.queue_prefix) if client is not None else None
        return _LEDGERS[key]


def turn_off(app: Any) -> Callable[[], None]:
    """No completion ledger for ``app`` in this process (the testing helper redelivers nothing).

    Returns the function that turns it back on.
    """
    key = (id(app), get_settings().queue_prefix)
    with _LEDGERS_LOCK:
        had, before = key in _LEDGERS, _LEDGERS.get(key)
        _LEDGERS[key] = None

    def restore() -> None:
        with _LEDGERS_LOCK:
            if had:
                _LEDGERS[key] = before
            else:
                _LEDGERS.pop(key, None)

    return restore


def flush_completions() -> None:
    """Send the completions noted in this process: called before an acknowledgement is sent."""
    if _ACKNOWLEDGES_HERE != os.getpid():
        return
    for ledger in list(_LEDGERS.values()):
        if ledger is not None:
            try:
                ledger.send_noted()
            except Exception:  # never in the way of the acknowledgement that follows
                logger.exception("Could not send the noted completions to the completion ledger.")
