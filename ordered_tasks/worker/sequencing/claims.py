"""A started message not yet begun in the pool may be taken back, to be parked with its key's waiting ones."""

from __future__ import annotations

import enum
import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds a withdrawn message's task waits for the spill's outcome before it says so (and waits on).
OUTCOME_WAIT = 60.0

#: Pools whose tasks run in the consumer's process (a thread or a greenlet of it), by module.
IN_PROCESS_POOLS = ("celery.concurrency.thread", "celery.concurrency.solo", "celery.concurrency.gevent",
                    "celery.concurrency.eventlet")


class Begin(enum.Enum):
    """What a task does when it begins in the pool."""

    #: Run it: it was not withdrawn (or it was, and the spill did not take it).
    RUN = "run"
    #: It was parked with its key's waiting messages: it ends without running (acknowledged).
    PARKED = "parked"
    #: Its spill failed once it may have written: run it as a redelivered copy (the guard asks the
    #: database whether it was parked after all).
    CHECK = "check"


class Claim:
    """Who may have one started message: the pool, to run it, or a spill of its key, to park it first.

    Its key's lane started it, so the key's later messages wait behind it;
    while it only waits in the pool's queue (behind whole windows of other
    partitions' tasks), a spill of those may take it too, as the head of
    the batch, so that it keeps its place in the parked order. Whichever
    comes first wins: :meth:`begin` (the pool) or :meth:`withdraw` (the
    lanes).
    """

    __slots__ = ("_decided", "_outcome", "_registry", "_state", "key", "task_id")

    def __init__(self, task_id: str, registry: Claims, key: str | None = None) -> None:
        self.task_id = task_id
        self.key = key
        self._registry = registry
        self._state = "queued"
        self._outcome: Begin | None = None
        self._decided: threading.Event | None = None  # made once withdrawn: most claims never are

    @property
    def withdrawn(self) -> bool:
        """Taken by a spill that has not failed: it is parked, or being parked."""
        return self._state == "withdrawn"

    def withdraw(self) -> bool:
        """The lanes take the message for a spill; False once it began in the pool."""
        with self._registry.lock:
            if self._state != "queued":
                return False
            self._state = "withdrawn"
            self._decided = threading.Event()
            return True

    def resolve(self, outcome: Begin) -> None:
        """The spill that took the message ended: tell its task (once; later calls change nothing)."""
        with self._registry.lock:
            if self._state != "withdrawn" or self._outcome is not None:
                return
            self._outcome = outcome
            if outcome is not Begin.PARKED:
                self._state = "returned"  # it runs after all, and is not taken again
            decided = self._decided
        if decided is not None:
            decided.set()

    def drop(self, settled: bool = False) -> None:
        """The message settled, or left the window without beginning here: forget the claim.

        A withdrawn one that did not settle stays until its task begins:
        the task, still in the pool's queue, must learn whether its spill
        parked it, whatever became of the window. One that settled will
        not begin (Celery acknowledged or rejected it without running it).
        """
        with self._registry.lock:
            if settled or not self.withdrawn:
                self._registry.forget(self)

    def begin(self) -> Begin:
        """The pool begins the message: run it, unless a spill took it (then wait for how that went)."""
        with self._registry.lock:
            self._registry.forget(self)
            if self._state == "queued":
                self._state = "running"
                return Begin.RUN
            if self._outcome is not None:
                return self._outcome
            decided = self._decided
        waited = 0.0
        while decided is not None and not decided.wait(OUTCOME_WAIT):
            waited += OUTCOME_WAIT
            logger.critical("Message %s was taken by a spill of its key %.0f s ago, and the spill has "
                            "not ended: its task waits for it (is the database answering?).",
                            self.task_id, waited)
        return self._outcome or Begin.CHECK


class Claims:
    """The claims of this process's started messages, by task id (only with a pool that runs tasks here)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Whether messages get claims: set by the consumer from its pool.
        self.enabled = False
        self._by_id: dict[str, Claim] = {}

    def new(self, task_id: Any, key: str | None = None) -> Claim | None:
        """A claim for a message of ``key`` about to start; None without one (or for a second of an id)."""
        if not self.enabled or not isinstance(task_id, str) or not task_id:
            return None
        with self.lock:
            if task_id in self._by_id:
                return None
            claim = self._by_id[task_id] = Claim(task_id, self, key)
            return claim

    def begin(self, task_id: Any, key: str | None = None) -> Begin:
        """Called as a task of ``key`` begins in the pool: :meth:`Claim.begin` of its claim, else RUN.

        Task ids are the producer's: another message of the same id (of
        another key, whose claim this is not) runs and leaves the claim to
        its own message.
        """
        claim = self._by_id.get(task_id) if isinstance(task_id, str) else None
        return Begin.RUN if claim is None or claim.key != key else claim.begin()

    def forget(self, claim: Claim) -> None:
        """The message began, or settled, or left the window: its id is free again."""
        if self._by_id.get(claim.task_id) is claim:
            del self._by_id[claim.task_id]

    def __len__(self) -> int:
        return len(self._by_id)


def runs_in_process(pool: Any) -> bool:
    """Whether ``pool``'s tasks run in this process, where they can see a claim."""
    return type(pool).__module__ in IN_PROCESS_POOLS


#: The claims of this process.
CLAIMS = Claims()
