"""Exclusivity in the pool: the fencing token of the message being run, and lease deadlines."""

from __future__ import annotations

import mmap
import struct
import time
from contextvars import ContextVar

#: The consumer's fencing token for the current message's partition (Redis
#: leases), or None where there is none (RabbitMQ: single active consumer).
FENCE: ContextVar[int | None] = ContextVar("ordered_tasks_fence", default=None)

#: The tenure of its partition that the message being run arrived in (RabbitMQ), or None; a
#: replay's messages run under their control message's.
TENURE: ContextVar[int | None] = ContextVar("ordered_tasks_tenure", default=None)

_SLOT = struct.Struct("d")


class LeaseDeadlines:
    """Per partition, until when this worker may start its messages (Redis leases).

    The worker's lease thread writes, after each renewal, the time (on the
    system-wide monotonic clock) at which each lease it holds could lapse,
    less a safety margin; 0 for a lease it does not hold. The memory is made
    before the pool forks, so a pool process checks the deadline right
    before it starts a message: a worker that was frozen (``SIGSTOP``, a VM
    pause, swap) past its lease does not run what it fetched before, after
    the partition's new owner has run later messages.
    """

    def __init__(self) -> None:
        self._memory: mmap.mmap | None = None
        self.partitions = 0

    def share(self, partitions: int) -> None:
        """Make the shared memory (before the pool forks); nothing is enforced until :meth:`enforce`."""
        self.partitions = partitions
        self._memory = mmap.mmap(-1, _SLOT.size * (partitions + 1))

    def enforce(self) -> None:
        """The worker holds leases (Redis): from now on, starts need a live deadline."""
        if self._memory is not None:
            _SLOT.pack_into(self._memory, 0, 1.0)

    def set(self, partition: int, until: float) -> None:
        """Lease thread: ``partition`` may start messages until ``until`` (``time.monotonic``)."""
        if self._memory is not None and 0 <= partition < self.partitions:
            _SLOT.pack_into(self._memory, _SLOT.size * (partition + 1), until)

    def allows(self, partition: int) -> bool:
        """Whether a message of ``partition`` may start now."""
        memory = self._memory
        if memory is None or not _SLOT.unpack_from(memory, 0)[0]:
            return True
        if not 0 <= partition < self.partitions:
            return True
        until: float = _SLOT.unpack_from(memory, _SLOT.size * (partition + 1))[0]
        return time.monotonic() < until


#: The deadlines of this worker and its pool processes.
DEADLINES = LeaseDeadlines()
