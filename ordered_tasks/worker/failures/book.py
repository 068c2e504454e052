"""The consumer's memory of the keys that are not active (blocked or retrying)."""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing
import struct
import threading
from collections.abc import Iterable, Iterator

from ...states import KeyStatus

logger = logging.getLogger(__name__)

_COUNTER = struct.Struct("Q")
#: Seconds a count waits for the counters' lock before it goes on without it.
LOCK_WAIT = 2.0
#: A partition's stamp: how many times its key states changed, and how many
#: times this worker (re)gained it.
Stamp = tuple[int, int]


class Versions:
    """Two counters per partition, in memory shared by a worker and its pool processes.

    Made before the pool forks, so that every pool process (also one that
    replaces a dead one) sees the same counters:

    * *changes*: the process that changes a key state of the partition counts
      it. Messages of different keys of a partition run at once, in several
      pool processes or threads, so a lock made before the fork guards each
      count.
    * *tenures*: the worker's main process counts each time the partition's
      messages start arriving again after the worker may have lost the
      partition (a new broker connection, a lease acquired). Another worker
      may have changed key states meanwhile, so every book reads the
      partition again.
    """

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self._memory = mmap.mmap(-1, _COUNTER.size * 2 * max(partitions, 1))
        self._lock = multiprocessing.Lock()
        #: Main process only: the partitions a message arrived from in their current tenure.
        self._arrived: set[int] = set()

    def _count(self, slot: int) -> int:
        return int(_COUNTER.unpack_from(self._memory, slot * _COUNTER.size)[0])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The counters' lock; after :data:`LOCK_WAIT` seconds, go on without it.

        A pool process killed (SIGKILL, the OOM killer) inside its few
        instructions under the lock would leave it held for good, and every
        other process would wedge at its next count. Going on unlocked risks
        one lost count at worst, which a later change or tenure repairs.
        """
        if self._lock.acquire(timeout=LOCK_WAIT):
            try:
                yield
            finally:
                self._lock.release()
            return
        logger.warning("The key-state counters' lock was not released within %.0f s (a pool process "
                       "died holding it?); counting without it.", LOCK_WAIT)
        yield

    def _increment(self, slot: int) -> None:
        with self._locked():
            _COUNTER.pack_into(self._memory, slot * _COUNTER.size, self._count(slot) + 1)

    def get(self, partition: int) -> Stamp:
        """The stamp of ``partition``: changes of its key states, and tenures."""
        if not 0 <= partition < self.partitions:
            return (0, 0)
        return (self._count(2 * partition), self._count(2 * partition + 1))

    def bump(self, partition: int) -> Stamp:
        """Count a change of ``partition``'s key states; return the new stamp (read with the count)."""
        if not 0 <= partition < self.partitions:
            return (0, 0)
        with self._locked():
            slot = 2 * partition
            _COUNTER.pack_into(self._memory, slot * _COUNTER.size, self._count(slot) + 1)
            return self.get(partition)

    def new_tenure(self, partitions: Iterable[int] | None = None) -> None:
        """Main process: the worker (re)gains ``partitions`` (None: all, a new connection).

        Their next message starts a new tenure (see :meth:`arrived`).
        """
        if partitions is None:
            self._arrived.clear()
        else:
            self._arrived.difference_update(partitions)

    def end_tenures(self) -> None:
        """Main process: the broker connection was replaced (RabbitMQ); every partition's tenure ends now.

        Not only at its next message: what the lost connection delivered,
        and is still in the pool's queue (or a replay running there), must
        not start once the queue may have another active consumer.
        """
        for partition in range(self.partitions):
            self._increment(2 * partition + 1)

    def tenure(self, partition: int) -> int:
        """The count of ``partition``'s tenures."""
        return self.get(partition)[1]

    def arrived(self, partition: int) -> bool:
        """Main process, before the message goes to a pool process: a message of ``partition`` arrived.

        The first one of a tenure counts a tenure, so that the process that
        runs it reads the partition's key states again; returns True for it.
        """
        if partition not in self._arrived and 0 <= partition < self.partitions:
            self._arrived.add(partition)
            self._increment(2 * partition + 1)
            return True
        return False


class KeyBook:
    """Statuses of held keys, per partition, loaded from the database on first use.

    Only the consumer of a partition changes the state of its keys, so after
    one query the book answers from memory: the happy path (an active key)
    costs no query. A worker shares :class:`Versions` with its pool
    processes: a process whose copy of a partition is older than another
    process's last change, or than the worker's latest (re)gain of the
    partition, reads the partition again. One query reads every partition
    of the worker whose copy is out of date, so a pool process starts with
    one query rather than one per partition. The threads of a process
    share its book under a lock.
    """

    def __init__(self) -> None:
        self._held: dict[int, dict[str, str]] = {}
        self._seen: dict[int, Stamp] = {}
        self.versions: Versions | None = None
        self.partitions: tuple[int, ...] = ()
        self._lock = threading.RLock()

    def share(self, versions: Versions, partitions: Iterable[int] = ()) -> None:
        """Use ``versions``, shared with the worker's pool processes (before they fork).

        ``partitions`` are the worker's: a load reads those that are out of date too.
        """
        self.versions = versions
        self.partitions = tuple(partitions)
        self.forget()

    def status(self, key: str, partition: int) -> str:
        """``"active"``, ``"retrying"`` or ``"blocked"``."""
        with self._lock:
            held = self._held[partition] if self._current(partition) else self.load(partition)
            return held.get(key, KeyStatus.ACTIVE.value)

    def _current(self, partition: int) -> bool:
        """Whether this book's copy of ``partition`` is up to date."""
        if partition not in self._held:
            return False
        return self.versions is None or self.versions.get(partition) == self._seen[partition]

    def load(self, partition: int) -> dict[str, str]:
        """Read the held keys of ``partition``, and of the worker's other out-of-date partitions."""
        with self._lock:
            return self._load(partition)

    def _load(self, partition: int) -> dict[str, str]:
        from ...models import AccountState

        stale = {partition, *(p for p in self.partitions if not self._current(p))}
        for p in stale:  # the stamp before the query: a change made meanwhile means another read
            self._seen[p] = self.versions.get(p) if self.versions is not None else (0, 0)
            self._held[p] = {}
        rows = AccountState.objects.filter(partition__in=sorted(stale)).exclude(status=KeyStatus.ACTIVE)
        for p, key, status in rows.values_list("partition", "key", "status"):
            self._held[p][key] = status
        return self._held[partition]

    def set(self, key: str, partition: int, status: str) -> None:
        """Record a status the consumer has just written to the database."""
        with self._lock:
            self._set(key, partition, status)

    def _set(self, key: str, partition: int, status: str) -> None:
        held = self._held.get(partition)
        if held is not None:
            if status == KeyStatus.ACTIVE:
                held.pop(key, None)
            else:
                held[key] = str(status)
        if self.versions is not None:
            changes, tenures = self.versions.bump(partition)
            if held is not None and self._seen.get(partition) == (changes - 1, tenures):
                self._seen[partition] = (changes, tenures)  # nobody else changed it in between
            else:
                self._held.pop(partition, None)  # read again on next use

    def new_tenure(self, partitions: Iterable[int] | None = None) -> None:
        """Main process: see :meth:`Versions.new_tenure` (nothing to do without shared counters)."""
        if self.versions is not None:
            self.versions.new_tenure(partitions)

    def arrived(self, partition: int) -> bool:
        """Main process: see :meth:`Versions.arrived` (False without shared counters)."""
        return self.versions is not None and self.versions.arrived(partition)

    def forget(self) -> None:
        """Drop everything (the next message of each partition reloads it)."""
        with self._lock:
            self._held.clear()
            self._seen.clear()


#: The book of this process.
BOOK = KeyBook()
