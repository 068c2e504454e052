"""Where a received message belongs: its key and partition, checked against its queue and arguments."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ...conf import get_settings
from ...exceptions import InvalidKeyError
from ...models import ParkedMessage
from ...options import KEY_HEADER, PARTITION_HEADER
from ...partitioning import MAX_KEY_LENGTH, canonical_key, partition_of
from ...routing import key_spec_for
from ..delivery import NO_KEY, queue_partition

Reason = ParkedMessage.Reason


@dataclass(frozen=True)
class Placement:
    """A message's ordering key and partition, as the consumer will hold it."""

    key: str
    partition: int


class Misfit(Exception):
    """A message that cannot be run in its place: it is parked instead.

    ``key`` is the key of this partition that the message blocks, or
    :data:`NO_KEY` when the message belongs to no key of the partition and
    is only kept as a record.
    """

    def __init__(self, reason: str, error: str, key: str, partition: int) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error
        self.key = key
        self.partition = partition




def shown_key(raw: object) -> str:
    """``raw`` as a string that fits the key column: a long one is cut and marked with its hash."""
    text = str(raw)
    if len(text) <= MAX_KEY_LENGTH:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{text[:MAX_KEY_LENGTH - 20]}...#{digest}"


def place(task: Any, request: Any, args: Any, kwargs: Any) -> Placement:
    """The key and partition of one received message, or :class:`Misfit` when they do not agree.

    The partition is the one whose queue delivered the message. The key is
    the task's key argument (its ``@ordered_task`` key or ``ROUTES``), else
    the ``ordered_key`` header. A header that disagrees with the arguments or
    the queue, a key that belongs to another partition, a missing key and
    one longer than :data:`~ordered_tasks.partitioning.MAX_KEY_LENGTH` are
    misfits: a producer that is not ordered_tasks' own got the wire format
    wrong, and running the message would break its key's order.
    """
    partitions = get_settings().partitions
    header_key = getattr(request, KEY_HEADER, None)
    header_partition = getattr(request, PARTITION_HEADER, None)
    arg_key, arg_error = _argument_key(task, args, kwargs)
    problem = None
    try:
        from_header = None if header_key is None else canonical_key(header_key)
    except InvalidKeyError as exc:
        from_header, problem = None, f"Unusable {KEY_HEADER} header {shown_key(header_key)!r}: {exc}"
    key = arg_key if arg_key is not None else from_header
    partition = queue_partition(getattr(request, "delivery_info", None))
    if partition is None:  # not from a partition queue (a replayed message says its queue)
        partition = _as_partition(header_partition, partitions)
    if partition is None:
        partition = partition_of(key, partitions) if key is not None else 0
    if key is None:
        raise Misfit(Reason.INVALID, problem or f"The message has no ordering key: no {KEY_HEADER} "
                     f"header, and {arg_error or 'the task declares no key argument'}.", NO_KEY, partition)
    belongs_to = partition_of(key, partitions)
    ours = belongs_to == partition
    if header_key is not None and from_header != key:
        raise Misfit(Reason.MISROUTED, f"The {KEY_HEADER} header {shown_key(header_key)!r} differs from "
                     f"the task's key argument {key!r}.", key if ours else NO_KEY, partition)
    if header_partition is not None and _as_partition(header_partition, partitions) != partition:
        raise Misfit(Reason.MISROUTED, f"The {PARTITION_HEADER} header says {header_partition!r}, but "
                     f"the message came from the queue of partition {partition}.",
                     key if ours else NO_KEY, partition)
    if not ours:
        raise Misfit(Reason.MISROUTED, f"Key {key!r} belongs to partition {belongs_to}, "
                     f"but the message came from the queue of partition {partition}. Publish it "
                     "to its key's queue (see the partitioning page of the docs).", NO_KEY, partition)
    return Placement(key, partition)


def _argument_key(task: Any, args: Any, kwargs: Any) -> tuple[str | None, str | None]:
    """The canonical key in the task's arguments, or None and why not."""
    spec = key_spec_for(getattr(task, "app", None), task.name, task)
    if spec is None:
        return None, None
    try:
        return spec.canonical(args, kwargs), None
    except InvalidKeyError as exc:
        return None, str(exc)


def _as_partition(value: object, partitions: int) -> int | None:
    """A partition header as a partition number, or None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if 0 <= number < partitions else None
