"""The messages each partition completed recently, kept in Redis to recognise redelivered copies."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

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

    def _key(self, partition: int) -> str:
        return f"ordered_tasks:completed:{queue_name(self.prefix, partition)}"

    def flush(self) -> None:
        """Read the replies of the writes sent so far (a refused write is logged)."""
        self.writer.flush()

    def record(self, partition: int, task_id: str) -> None:
        """Note that ``task_id`` completed; a failure is logged.

        The command is sent without waiting for its reply (replies are read
        in batches, see :class:`Unanswered`): the task's acknowledgement does
        not wait a round trip, and the write has left the process before the
        task returns, so it reaches Redis even if the worker dies right after.
        """
        key = self._key(partition)
        self.writes += 1
        commands: list[tuple[Any, ...]] = [("ZADD", key, time.time(), task_id)]
        if self.writes % TRIM_EVERY == 0:
            commands.append(("ZREMRANGEBYRANK", key, 0, -self.size - 1))
        try:
            self.writer.send(*commands)
        except redis.RedisError as exc:
            logger.warning("Could not record completion of %s: %r", task_id, exc)

    def completed(self, partition: int, task_id: str) -> bool:
        """Whether ``task_id`` is among the tasks ``partition`` completed recently."""
        try:
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
    with _LEDGERS_LOCK:
        if key not in _LEDGERS:
            client = coordination_client(app)
            _LEDGERS[key] = Ledger(client, conf.queue_prefix) if client is not None else None
        return _LEDGERS[key]
