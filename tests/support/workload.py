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


def assert_partitions_never_overlap(results: redis.Redis, run: str) -> None:
    """No two tasks of one partition ran at the same time."""
    spans: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for entry in results.lrange(f"{run}:spans", 0, -1):
        key, seq, start, end, _pid = entry.split("|")
        spans[partition_for(key)].append((float(start), float(end), f"{key}#{seq}"))
    for partition, items in spans.items():
        items.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(items):
            assert start >= end, f"partition {partition}: {b} started before {a} ended"


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
