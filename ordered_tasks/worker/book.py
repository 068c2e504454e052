"""The consumer's memory of the keys that are not active (blocked or retrying)."""

from __future__ import annotations

import mmap
import struct

from ..models import ACTIVE

_COUNTER = struct.Struct("Q")


class Versions:
    """One change counter per partition, in memory shared by a worker and its pool processes.

    Made before the pool forks, so that every pool process (also one that
    replaces a dead one) sees the same counters. Only the process running a
    partition's message changes the partition's key states, and a partition
    has one message in the worker at a time, so no two processes bump the
    same counter at once.
    """

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self._memory = mmap.mmap(-1, _COUNTER.size * max(partitions, 1))

    def get(self, partition: int) -> int:
        """How many times ``partition``'s key states changed."""
        if not 0 <= partition < self.partitions:
            return 0
        return int(_COUNTER.unpack_from(self._memory, partition * _COUNTER.size)[0])

    def bump(self, partition: int) -> int:
        """Count a change of ``partition``'s key states; return the new count."""
        if not 0 <= partition < self.partitions:
            return 0
        count = self.get(partition) + 1
        _COUNTER.pack_into(self._memory, partition * _COUNTER.size, count)
        return count


class KeyBook:
    """Statuses of held keys, per partition, loaded from the database on first use.

    Only the consumer of a partition changes the state of its keys, so after
    one query per partition the book answers from memory: the happy path
    (an active key) costs no query. A worker with several pool processes
    shares :class:`Versions` with them: a process whose copy of a partition
    is older than another process's last change reads the partition again.
    """

    def __init__(self) -> None:
        self._held: dict[int, dict[str, str]] = {}
        self._seen: dict[int, int] = {}
        self.versions: Versions | None = None

    def share(self, versions: Versions) -> None:
        """Use ``versions``, shared with the other processes of this worker (before they fork)."""
        self.versions = versions
        self.forget()

    def status(self, key: str, partition: int) -> str:
        """``"active"``, ``"retrying"`` or ``"blocked"``."""
        held = self._held.get(partition)
        versions = self.versions
        if held is None or (versions is not None and versions.get(partition) != self._seen[partition]):
            held = self.load(partition)
        return held.get(key, ACTIVE)

    def load(self, partition: int) -> dict[str, str]:
        """Read the held keys of ``partition`` from the database."""
        from ..models import AccountState

        self._seen[partition] = self.versions.get(partition) if self.versions is not None else 0
        rows = AccountState.objects.filter(partition=partition).exclude(status=ACTIVE)
        held = self._held[partition] = dict(rows.values_list("key", "status"))
        return held

    def set(self, key: str, partition: int, status: str) -> None:
        """Record a status the consumer has just written to the database."""
        held = self._held.get(partition)
        if held is not None:
            if status == ACTIVE:
                held.pop(key, None)
            else:
                held[key] = status
        if self.versions is not None:
            version = self.versions.bump(partition)
            if held is not None and self._seen.get(partition) == version - 1:
                self._seen[partition] = version  # nobody else changed it in between
            else:
                self._held.pop(partition, None)  # read again on next use

    def forget(self) -> None:
        """Drop everything (the next message of each partition reloads it)."""
        self._held.clear()
        self._seen.clear()


#: The book of this process.
BOOK = KeyBook()
