"""Named states of keys and actions on them, shared by the producer, the admin and the worker."""

from __future__ import annotations

from enum import Enum


class _Named(str, Enum):
    """A string enum whose members print as their value."""

    def __str__(self) -> str:
        return str(self.value)


class KeyStatus(_Named):
    """Where a key stands; a key that never failed has no state and counts as active."""

    ACTIVE = "active"
    RETRYING = "retrying"
    BLOCKED = "blocked"


class ControlAction(_Named):
    """What a control message asks of a key's partition consumer."""

    #: Run the parked messages of a blocked key again, in their order.
    REPLAY = "replay"
    #: Set aside the failed head message of a blocked key, then run the rest.
    SKIP = "skip"
    #: An in-place retry may be due: look at the key again.
    WAKE = "wake"
