"""Work done for the consumer off its event loop (in the pool, or a side thread) that always reports back."""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Callable

logger = logging.getLogger(__name__)
#: A side thread's job: the function, its arguments, and what to call with its result or its error.
Job = tuple[Callable[..., Any], tuple[Any, ...], Callable[[Any], Any], Callable[[Any], Any]]


def reporting(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """Pool side: ``(True, result)``, or ``(False, what went wrong)`` instead of raising.

    Celery's threads pool drops what a function raises (its ``apply_target``
    calls the callback only on success and ignores ``error_callback``), and
    the solo pool raises it into the consumer's event loop; a result both
    always deliver.
    """
    try:
        return True, fn(*args)
    except Exception as exc:
        logger.exception("%s failed in the pool", getattr(fn, "__name__", fn))
        return False, repr(exc)


def run_in_pool(pool: Any, fn: Callable[..., Any], args: tuple[Any, ...],
                done: Callable[[Any], Any], failed: Callable[[Any], Any]) -> None:
    """Run ``fn(*args)`` in a pool process or thread; then ``done(result)`` or ``failed(error)``.

    ``fn`` must be a module-level function (the prefork pool pickles it).
    The callbacks run in the consumer's process, in the pool's thread with
    the threads pool: hand anything that touches the consumer to its loop.
    """

    def outcome(result: Any) -> None:
        ok, value = result if isinstance(result, tuple) and len(result) == 2 else (False, result)
        (done if ok else failed)(value)

    pool.apply_async(reporting, args=(fn, *args), callback=outcome, error_callback=failed)


class SideThread:
    """One thread of the consumer's process that runs short database jobs in order, beside the pool.

    The pool's queue may hold a whole window of tasks per partition ahead of
    a job sent there, so a job that the partition waits for (a crowded key's
    spill) would wait for them; this thread runs it at once. Its callbacks
    run in this thread: hand anything that touches the consumer to its loop.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        # queue.Queue, not SimpleQueue: gevent's monkey-patching makes it cooperative.
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], done: Callable[[Any], Any],
               failed: Callable[[Any], Any]) -> None:
        """Run ``fn(*args)`` after the jobs before it; then ``done(result)`` or ``failed(error)``."""
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._jobs = queue.Queue()
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._pid = os.getpid()
                self._thread.start()
            self._jobs.put((fn, args, done, failed))

    def _serve(self) -> None:
        from django.db import close_old_connections

        while True:
            fn, args, done, failed = self._jobs.get()
            ok, value = reporting(fn, *args)
            if not ok:
                close_old_connections()  # a connection broken by a database outage is not kept
            try:
                (done if ok else failed)(value)
            except Exception:
                logger.exception("A callback of %s failed", self.name)


#: The side thread of this process: crowded keys' spills, the wake-ups of a new tenure.
SIDE = SideThread("ordered-side")
