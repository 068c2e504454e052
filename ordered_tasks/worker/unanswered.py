"""Redis commands sent on a connection of their own, without waiting for their replies."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis

logger = logging.getLogger(__name__)

#: Replies left unread before a write reads them all (a few bytes each).
UNREAD_LIMIT = 64
#: Seconds before redis-py's next health check at which waiting replies are read first.
HEALTH_CHECK_MARGIN = 1.0


class Unanswered:
    """A Redis connection whose writes do not wait a round trip.

    Each write is sent at once; the replies are read together once
    :data:`UNREAD_LIMIT` are waiting, before a read command, or on
    :meth:`flush`, when they have long arrived: one system call reads them
    all, and a refused write is still logged, a few commands late. A forked
    child opens a connection of its own, so that it never reads its
    parent's replies.

    Nothing else may read a reply of this connection before :meth:`flush`
    does. redis-py's health check (kombu sets ``health_check_interval`` to
    25 s on its pools) sends a ``PING`` before a command on a connection
    that was quiet for longer than the interval, and takes the first reply
    it reads for the answer. So the waiting replies are read first whenever
    a health check is due.

    The threads of a process (the threads pool) share it under a lock.
    """

    def __init__(self, pool: Any, what: str) -> None:
        self.pool = pool
        self.what = what
        self._connection: Any = None
        self._pid = 0
        self._unread = 0
        #: When a reply was last read on the connection (monotonic; no later than the truth).
        self._read_at = 0.0
        self._lock_pid = 0
        self._lock_of_pid = threading.RLock()

    @property
    def _lock(self) -> threading.RLock:
        """The lock of the current process (a forked child must not inherit a lock held at the fork)."""
        if self._lock_pid != os.getpid():
            self._lock_of_pid, self._lock_pid = threading.RLock(), os.getpid()
        return self._lock_of_pid

    def _conn(self) -> Any:
        if self._pid != os.getpid():
            self._connection, self._unread, self._pid = None, 0, os.getpid()
        if self._connection is None:
            self._read_at = time.monotonic()  # its first command may PING: nothing is unread then
            try:
                self._connection = self.pool.get_connection()
            except TypeError:  # redis-py before 5.3 wants a command name
                self._connection = self.pool.get_connection("_")
        return self._connection

    def _health_check_due(self, connection: Any) -> bool:
        """Whether redis-py may ``PING`` ``connection`` before its next command.

        redis-py checks its health when ``health_check_interval`` seconds
        passed since it last read a reply (by the wall clock before redis-py
        6, by the monotonic clock since), so the check is timed here from the
        replies this class read, with a margin.
        """
        interval = getattr(connection, "health_check_interval", 0)
        return bool(interval) and time.monotonic() + HEALTH_CHECK_MARGIN > self._read_at + interval

    def reset(self) -> None:
        """Drop the connection (after an error); the next command opens a new one."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        if self._connection is not None and self._pid == os.getpid():
            self._connection.disconnect()
        self._unread = 0

    def flush(self) -> None:
        """Read the replies of the writes sent so far; a refused write is logged.

        A connection error is raised after a reset, as in :meth:`send` and :meth:`ask`.
        """
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        try:
            connection = self._conn()
            if self._unread:
                self._read_at = time.monotonic()
            while self._unread:
                self._unread -= 1
                try:
                    connection.read_response()
                except redis.ResponseError as exc:
                    logger.warning("Redis refused a write of %s: %r", self.what, exc)
        except redis.RedisError:
            self._reset()
            raise

    def send(self, *commands: tuple[Any, ...]) -> None:
        """Send ``commands`` without waiting; a connection error is raised after a reset."""
        with self._lock:
            self._send(commands)

    def _send(self, commands: tuple[tuple[Any, ...], ...]) -> None:
        try:
            connection = self._conn()
            if self._unread >= UNREAD_LIMIT or (self._unread and self._health_check_due(connection)):
                self._flush()
            connection.send_packed_command(connection.pack_commands(commands))
            self._unread += len(commands)
        except redis.RedisError:
            self._reset()
            raise

    def ask(self, *command: Any) -> Any:
        """Send one command and return its reply."""
        with self._lock:
            return self._ask(command)

    def _ask(self, command: tuple[Any, ...]) -> Any:
        try:
            self._flush()
            connection = self._conn()
            connection.send_command(*command)
            self._read_at = time.monotonic()
            return connection.read_response()
        except redis.RedisError:
            self._reset()
            raise
