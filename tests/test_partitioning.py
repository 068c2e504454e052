"""The key hash: canonical forms, fixed vectors, spread and stability across processes."""

from __future__ import annotations

import collections
import subprocess
import sys
import uuid

import pytest

from ordered_tasks import InvalidKeyError, OrderedTaskError, canonical_key, partition_for, queue_for
from ordered_tasks.partitioning import jump_hash, key_hash, partition_of


@pytest.mark.parametrize(
    ("key", "buckets", "expected"),
    # The reference vectors every published jump-hash implementation agrees on.
    [(1, 1, 0), (42, 57, 43), (0xDEAD10CC, 1, 0), (0xDEAD10CC, 666, 361), (256, 1024, 520),
     (1, 128, 55), (129, 128, 120), (128, 100000000, 38172097), (18446744073709551615, 128, 92)],
)
def test_jump_hash_reference_vectors(key: int, buckets: int, expected: int) -> None:
    assert jump_hash(key, buckets) == expected


VECTORS = [
    ("account-1", "account-1", 0x07E998012C1137DE, [0, 3, 3, 426]),
    (42, "42", 0x73475CB40A568E8D, [0, 0, 12, 630]),
    ("42", "42", 0x73475CB40A568E8D, [0, 0, 12, 630]),
    ("ü-ñ", "ü-ñ", 0xD6186BCBB8E7D792, [0, 4, 9, 767]),
    (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678",
     0x749408F8A9DA7854, [0, 2, 13, 498]),
    (-7, "-7", 0xA770D3270C9DCDED, [0, 0, 0, 937]),
]


@pytest.mark.parametrize(("key", "canonical", "hashed", "partitions"), VECTORS)
def test_fixed_vectors(key: object, canonical: str, hashed: int, partitions: list[int]) -> None:
    assert canonical_key(key) == canonical
    assert key_hash(canonical) == hashed
    assert [partition_of(key, p) for p in (1, 8, 16, 1024)] == partitions


def test_uuid_and_its_string_share_a_partition() -> None:
    value = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert partition_of(value, 64) == partition_of(str(value), 64)


@pytest.mark.parametrize("bad", [None, "", True, False, 1.5, b"abc", ("a",), object()])
def test_invalid_keys_raise(bad: object) -> None:
    with pytest.raises(InvalidKeyError) as info:
        canonical_key(bad)
    assert isinstance(info.value, OrderedTaskError)
    assert "str, an int or a UUID" in str(info.value)


def test_keys_spread_evenly() -> None:
    counts = collections.Counter(partition_of(f"account-{n}", 16) for n in range(32000))
    assert sorted(counts) == list(range(16))
    expected = 32000 / 16
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 37.7  # 99.9th percentile of chi-square with 15 degrees of freedom


def test_growing_partitions_only_moves_keys_to_the_new_one() -> None:
    moved = 0
    for n in range(5000):
        before, after = partition_of(n, 16), partition_of(n, 17)
        assert after in (before, 16)
        moved += after != before
    assert 200 < moved < 400  # about 1/17 of the keys


def test_same_partition_in_other_processes_with_other_hash_seeds() -> None:
    keys = ["alpha", "beta", "42", "ü"]
    here = [partition_of(k, 16) for k in keys]
    code = f"from ordered_tasks.partitioning import partition_of; print([partition_of(k, 16) for k in {keys!r}])"
    for seed in ("1", "2", "random"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""})
        assert out.stdout.strip() == str(here)


def test_partition_for_and_queue_for_follow_settings(settings) -> None:
    settings.ORDERED_TASKS = {"PARTITIONS": 1024, "QUEUE_PREFIX": "acct"}
    assert partition_for("account-1") == 426
    assert queue_for("account-1") == "acct.426"
    settings.ORDERED_TASKS = {"PARTITIONS": 8}
    assert queue_for("account-1") == "ordered.3"
    assert partition_for("account-1", partitions=16) == 3
