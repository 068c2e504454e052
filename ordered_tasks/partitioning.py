"""Stable mapping of ordering keys to partitions and queue names.

The algorithm, which any producer in any language can reproduce:

1. Canonicalise the key to a string: ``str`` as is, ``int`` in decimal
   (``-42`` -> ``"-42"``), :class:`uuid.UUID` in its lowercase hyphenated form.
   ``bool``, ``None``, the empty string and every other type are rejected.
2. Encode that string as UTF-8, hash it with SHA-256 and read the first eight
   bytes of the digest as an unsigned big-endian 64-bit integer.
3. Map that integer onto ``P`` partitions with the jump consistent hash of
   Lamping and Veach (2014), using 64-bit unsigned wrap-around arithmetic and
   IEEE-754 double division, exactly as :func:`jump_hash` does.
4. The queue of partition ``p`` is ``f"{QUEUE_PREFIX}.{p}"``.

Nothing here uses Python's :func:`hash`, which is salted per process.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from typing import Union

from .exceptions import InvalidKeyError

Key = Union[str, int, uuid.UUID]

_MASK64 = 0xFFFFFFFFFFFFFFFF
_JUMP_MULTIPLIER = 2862933555777941757

#: The longest canonical key (keys of failed tasks are stored in an indexed column).
MAX_KEY_LENGTH = 255


def canonical_key(key: object) -> str:
    """Return the canonical string form of ``key`` or raise InvalidKeyError."""
    if isinstance(key, str):
        if not key:
            raise InvalidKeyError(
                "The ordering key is an empty string. Pass a non-empty str, an "
                "int or a UUID identifying the account."
            )
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidKeyError(
                f"The ordering key {key[:40]!r}... has {len(key)} characters; at most "
                f"{MAX_KEY_LENGTH} are allowed (the key is stored when it fails). Use a "
                "shorter account identifier."
            )
        return key
    if isinstance(key, bool) or key is None:
        raise InvalidKeyError(
            f"The ordering key is {key!r}. Pass a non-empty str, an int or a "
            "UUID identifying the account."
        )
    if isinstance(key, int):
        return str(int(key))
    if isinstance(key, uuid.UUID):
        return str(key)
    raise InvalidKeyError(
        f"The ordering key {key!r} has type {type(key).__name__}, which ordered_tasks "
        "cannot hash stably. Pass a str, an int or a UUID (convert the value "
        "yourself, for example with str())."
    )


def key_hash(canonical: str) -> int:
    """Return the stable unsigned 64-bit hash of a canonical key string."""
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash: map a 64-bit integer onto ``range(buckets)``."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _JUMP_MULTIPLIER + 1) & _MASK64
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def partition_of(key: object, partitions: int) -> int:
    """Partition of ``key`` among ``partitions`` partitions (pure, settings-free)."""
    return _partition_of_canonical(canonical_key(key), partitions)


@functools.lru_cache(maxsize=4096)
def _partition_of_canonical(canonical: str, partitions: int) -> int:
    """Cached: a publish computes its key's partition twice (router, then publish guard)."""
    return jump_hash(key_hash(canonical), partitions)


def queue_name(prefix: str, partition: int) -> str:
    """Queue name of a partition."""
    return f"{prefix}.{partition}"


def partition_for(key: object, partitions: int | None = None) -> int:
    """Partition of ``key``; ``partitions`` defaults to ``ORDERED_TASKS["PARTITIONS"]``."""
    if partitions is None:
        from .conf import get_settings

        partitions = get_settings().partitions
    return partition_of(key, partitions)
