"""Tasks that record when and where they ran, in Redis, for the integration tests."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import shared_task

from ordered_tasks import ordered_task

_client: redis.Redis | None = None


def recorder() -> redis.Redis:
    """Redis connection of the current process for the recorded results."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ.get("TEST_RESULTS_URL", "redis://127.0.0.1:6379/15"))
    return _client


def record(run: str, key: Any, seq: int, sleep: float) -> None:
    """Append ``seq`` to the key's list and the execution span to the run's log."""
    started = time.time()
    if sleep:
        time.sleep(sleep)
    pipe = recorder().pipeline(transaction=False)
    pipe.rpush(f"{run}:key:{key}", seq)
    pipe.rpush(f"{run}:spans", f"{key}|{seq}|{started}|{time.time()}|{os.getpid()}")
    pipe.incr(f"{run}:done")
    pipe.execute()


@ordered_task(key="key", ignore_result=True)
def ordered_record(run: str, key: Any, seq: int, sleep: float = 0.0) -> None:
    """Ordered by ``key``."""
    record(run, key, seq, sleep)


@ordered_task(key=lambda payload, **_: payload["account"], ignore_result=True, name="tests.callable_key")
def callable_key_record(payload: dict[str, Any], run: str) -> None:
    """Ordered by a key a callable digs out of the payload."""
    record(run, payload["account"], payload["seq"], 0.0)


@shared_task(ignore_result=True)
def plain_record(run: str, key: Any, seq: int) -> None:
    """A plain task of the same project: normal routing."""
    record(run, key, seq, 0.0)


@shared_task(ignore_result=True, name="events.external_record")
def external_record(run: str, key: Any, seq: int, sleep: float = 0.0) -> None:
    """Published by name from another service; ``ORDERED_TASKS['ROUTES']`` orders it."""
    record(run, key, seq, sleep)
