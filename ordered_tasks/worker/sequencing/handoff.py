"""Calls made in a pool thread run on the consumer's event loop instead; a pipe wakes the loop."""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Any, Callable

logger = logging.getLogger(__name__)


class LoopCalls:
    """Runs callables on the thread of the consumer's event loop.

    With the threads pool, Celery acknowledges a task from the pool thread
    that ran it, and the acknowledgement is what starts the next message of
    the key. Starting a message touches the consumer's state (Celery's
    reserved requests, the prefetch count, the lanes), which belongs to the
    event loop's thread; so a call made in another thread is queued, and a
    byte written to a pipe that the loop reads wakes the loop to run it
    (kombu's own ``call_soon`` does not wake a sleeping loop before kombu
    5.6). Without an event loop (gevent, eventlet: one thread) calls run at
    once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: deque[Callable[[], Any]] = deque()
        self._pending = False
        self._pipe: tuple[int, int] | None = None
        self._hub: Any = None
        self._loop_thread: int | None = None

    def attach(self, hub: Any) -> None:
        """Called on the loop's thread at every start of the consumer's loop (the hub forgets its readers)."""
        if hub is None:
            return
        if self._pipe is None:
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            self._pipe = (read, write)
        self._loop_thread = threading.get_ident()
        if self._hub is hub and self._pipe[0] in getattr(hub, "readers", {}):
            return
        self._hub = hub
        hub.add_reader(self._pipe[0], self._drain)
        self._drain()  # calls queued while the loop was not running

    def in_loop(self) -> bool:
        """Whether a call made now may run at once (on the loop's thread, or there is no loop)."""
        return self._loop_thread is None or threading.get_ident() == self._loop_thread

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` now on the loop's thread, else queue it for the loop and wake the loop."""
        if self.in_loop():
            fn()
            return
        with self._lock:
            self._calls.append(fn)
            wake = not self._pending
            self._pending = True
        if wake and self._pipe is not None:
            try:
                os.write(self._pipe[1], b"\0")
            except BlockingIOError:  # the pipe is full: the loop wakes anyway
                pass

    def _drain(self, *_: Any) -> None:
        if self._pipe is not None:
            try:
                while os.read(self._pipe[0], 4096):
                    pass
            except BlockingIOError:
                pass
        with self._lock:
            calls, self._calls = self._calls, deque()
            self._pending = False
        for fn in calls:
            try:
                fn()
            except Exception:  # one failing call must not keep the others from running
                logger.exception("A call handed to the event loop failed.")


#: The calls of this process's consumer (a worker has one event loop).
LOOP = LoopCalls()
