"""The same task four ways: plain, plain with late acknowledgement, under a lock per key, and ordered.

Each task is trivial, or waits ``sleep`` seconds first (a call to a database or another service).
"""

from __future__ import annotations

import functools
import time

import redis
from celery import shared_task
from django.conf import settings

from ordered_tasks import ordered_task


@functools.lru_cache(maxsize=1)
def results() -> redis.Redis:
    """The Redis the tasks record into."""
    return redis.Redis.from_url(settings.BENCH_RESULTS_URL)


def record(run: str, key: str, seq: int, published: float, sleep: float = 0.0) -> None:
    """One ``RPUSH`` per task, the same for every variant: key, sequence, publish and finish times."""
    if sleep:
        time.sleep(sleep)
    results().rpush(f"bench:{run}", f"{key}|{seq}|{published}|{time.time()}")


@shared_task(ignore_result=True)
def plain_task(run: str, key: str, seq: int, published: float, sleep: float = 0.0) -> None:
    """Plain Celery: runs wherever a worker is free."""
    record(run, key, seq, published, sleep)


@shared_task(ignore_result=True, acks_late=True)
def safe_task(run: str, key: str, seq: int, published: float, sleep: float = 0.0) -> None:
    """Plain Celery with late acknowledgement: a crash does not lose the message."""
    record(run, key, seq, published, sleep)


@shared_task(ignore_result=True, acks_late=True)
def locked_task(run: str, key: str, seq: int, published: float, sleep: float = 0.0) -> None:
    """The usual workaround: a Redis lock per key around the body (no order, only exclusion)."""
    with results().lock(f"bench:lock:{key}", timeout=30, blocking_timeout=30):
        record(run, key, seq, published, sleep)


@ordered_task(key="key", ignore_result=True)
def ordered_step(run: str, key: str, seq: int, published: float, sleep: float = 0.0) -> None:
    """Ordered by key."""
    record(run, key, seq, published, sleep)
