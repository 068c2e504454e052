"""Publishing a recorded workload, and checking what the workers made of it."""

from __future__ import annotations

import itertools
import random
import uuid
from collections import defaultdict

import redis
from celery import Celery

from ordered_tasks import partition_for

#: The ordered task that records each run in the results Redis.
ORDERED = "tests.testapp.tasks.ordered_record"
#: The prefix of the test project's task names.
T = "tests.testapp.tasks."


def publish_interleaved(app: Celery, run: str, keys: int, per_key: int, seed: int = 1,
                        slow: float = 0.0) -> int:
    """Publish ``per_key`` tasks for each of ``keys`` keys, randomly interleaved, in order per key."""
    rng = random.Random(seed)
    next_seq = dict.fromkeys(range(keys), 0)
    task = app.tasks[ORDERED]
    total = keys * per_key
    with app.producer_or_acquire() as producer:
        for _ in range(total):
            key = rng.choice([k for k, n in next_seq.items() if n < per_key])
            next_seq[key] += 1
            sleep = slow if rng.random() < 0.05 else 0.0
            if key % 7 == 0:  # some arrive by name, as from another service
                kwargs = {"run": run, "key": f"k{key}", "seq": next_seq[key], "sleep": sleep}
                app.send_task("events.external_record", kwargs=kwargs, producer=producer)
            else:
                task.apply_async(kwargs={"run": run, "key": f"k{key}", "seq": next_seq[key], "sleep": sleep},
                                 producer=producer)
    return total


def assert_in_order(results: redis.Redis, run: str, keys: int, per_key: int, redelivered: int = 0) -> None:
    """Every key ran 1..per_key in order; at most ``redelivered`` tasks ran twice in a row."""
    repeats = 0
    for key in range(keys):
        seqs = [int(s) for s in results.lrange(f"{run}:key:k{key}", 0, -1)]
        collapsed = [s for i, s in enumerate(seqs) if i == 0 or s != seqs[i - 1]]
        repeats += len(seqs) - len(collapsed)
        assert collapsed == list(range(1, per_key + 1)), f"key k{key} ran as {seqs}"
    assert repeats <= redelivered, f"{repeats} tasks ran twice"


def _spans(results: redis.Redis, run: str) -> dict[str, list[tuple[float, float, str]]]:
    """The recorded (start, end, "key#seq") of each task of ``run``, per key, sorted."""
    spans: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for entry in results.lrange(f"{run}:spans", 0, -1):
        key, seq, start, end, _pid = entry.split("|")
        spans[key].append((float(start), float(end), f"{key}#{seq}"))
    for items in spans.values():
        items.sort()
    return spans


def assert_keys_never_overlap(results: redis.Redis, run: str) -> None:
    """No two tasks of one key ran at the same time."""
    for key, items in _spans(results, run).items():
        for (_, end, a), (start, _, b) in itertools.pairwise(items):
            assert start >= end, f"key {key}: {b} started before {a} ended"


def overlaps_within_partitions(results: redis.Redis, run: str) -> int:
    """How many times a task started while a task of another key of its partition ran."""
    by_partition: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for key, items in _spans(results, run).items():
        by_partition[partition_for(key)].extend(items)
    overlaps = 0
    for items in by_partition.values():
        items.sort()
        latest_end = float("-inf")
        for start, end, _ in items:
            overlaps += start < latest_end
            latest_end = max(latest_end, end)
    return overlaps


def fail(results: redis.Redis, run: str, key: str, seq: int, times: int = -1) -> None:
    """Make task ``seq`` of ``key`` fail ``times`` times (-1: always)."""
    results.set(f"{run}:fail:{key}:{seq}", times)


def ran(results: redis.Redis, run: str, key: str) -> list[int]:
    """The sequence numbers of ``key`` that ran, in the order they ran."""
    return [int(s) for s in results.lrange(f"{run}:key:{key}", 0, -1)]


def same_partition_keys(count: int) -> list[str]:
    """``count`` keys that hash to the same partition."""
    first = f"acct-{uuid.uuid4().hex[:8]}"
    keys = [first]
    n = 0
    while len(keys) < count:
        n += 1
        candidate = f"{first}-{n}"
        if partition_for(candidate) == partition_for(first):
            keys.append(candidate)
    return keys


def publish(app: Celery, name: str, run: str, *pairs: tuple[str, int]) -> None:
    """Publish task ``name`` of the test project once per ``(key, seq)``."""
    task = app.tasks[T + name]
    with app.producer_or_acquire() as producer:
        for key, seq in pairs:
            task.apply_async(kwargs={"run": run, "key": key, "seq": seq}, producer=producer)


def status(key: str) -> str | None:
    """The stored status of ``key``, or None."""
    from ordered_tasks.models import AccountState

    return AccountState.objects.filter(key=key).values_list("status", flat=True).first()


def parked(key: str) -> list[tuple[str, str]]:
    """``(reason, state)`` of each parked row of ``key``, in order."""
    from ordered_tasks.models import ParkedMessage

    rows = ParkedMessage.objects.filter(key=key).order_by("position")
    return [(r.reason, r.state) for r in rows]
