"""The consumer's memory of the keys that are not active (blocked or retrying)."""

from __future__ import annotations

from ..models import ACTIVE


class KeyBook:
    """Statuses of held keys, per partition, loaded from the database on first use.

    Only the consumer of a partition changes the state of its keys, so after
    one query per partition the book answers from memory: the happy path
    (an active key) costs no query.
    """

    def __init__(self) -> None:
        self._loaded: set[int] = set()
        self._held: dict[str, str] = {}

    def status(self, key: str, partition: int) -> str:
        """``"active"``, ``"retrying"`` or ``"blocked"``."""
        if partition not in self._loaded:
            self.load(partition)
        return self._held.get(key, ACTIVE)

    def load(self, partition: int) -> None:
        """Read the held keys of ``partition`` from the database."""
        from ..models import AccountState

        held = AccountState.objects.filter(partition=partition).exclude(status=ACTIVE)
        for key, status in held.values_list("key", "status"):
            self._held[key] = status
        self._loaded.add(partition)

    def set(self, key: str, status: str) -> None:
        """Record a status the consumer has just written to the database."""
        if status == ACTIVE:
            self._held.pop(key, None)
        else:
            self._held[key] = status

    def forget(self) -> None:
        """Drop everything (the next message of each partition reloads it)."""
        self._loaded.clear()
        self._held.clear()


#: The book of this process (each worker process runs one task at a time).
BOOK = KeyBook()
