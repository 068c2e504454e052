"""Tasks that record when and where they ran, in Redis, for the integration tests."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis
from celery import shared_task
from celery.exceptions import Ignore

from ordered_tasks import ordered_task

_client: redis.Redis | None = None
_client_lock = threading.Lock()


def recorder() -> redis.Redis:
    """Redis connection of the current process for the recorded results.

    Made once under a lock: with the threads pool, a second client made by a
    racing thread would replace the first, whose collection closes its pool's
    connections under a pipeline still using them.
    """
    global _client
    with _client_lock:
        if _client is None:
            _client = redis.Redis.from_url(os.environ.get("TEST_RESULTS_URL", "redis://127.0.0.1:6379/15"))
        return _client


def record(run: str, key: Any, seq: int, sleep: float) -> None:
    """Append ``seq`` to the key's list and the execution span to the run's log.

    A task that sleeps first notes that it started, so that a test can act while it runs.
    """
    started = time.time()
    if sleep:
        recorder().rpush(f"{run}:started:{key}", seq)
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


class Boom(Exception):
    """The failure the tests switch on and off."""


def attempt(run: str, key: Any, seq: int) -> None:
    """Count the attempt; raise Boom while the test's failure counter for it is positive.

    ``{run}:fail:{key}:{seq}`` holds how many more attempts fail (-1: all of them).
    """
    client = recorder()
    client.incr(f"{run}:attempts:{key}:{seq}")
    left = int(client.get(f"{run}:fail:{key}:{seq}") or 0)
    if left:
        if left > 0:
            client.decr(f"{run}:fail:{key}:{seq}")
        raise Boom(f"{key}#{seq} failed on purpose")


@ordered_task(key="key", ignore_result=True)
def strict_step(run: str, key: Any, seq: int) -> None:
    """Blocks its key when it fails (the default policy)."""
    attempt(run, key, seq)
    record(run, key, seq, 0.0)


@ordered_task(key="key", ignore_result=True)
def ignoring_step(run: str, key: Any, seq: int) -> None:
    """Does its work, then raises Celery's ``Ignore`` (as ``Task.replace`` does)."""
    record(run, key, seq, 0.0)
    raise Ignore()


@ordered_task(key="key", ignore_result=True, autoretry_for=(Boom,), max_retries=3, retry_backoff=1,
              retry_jitter=False)
def autoretry_step(run: str, key: Any, seq: int, sleep: float = 0.0) -> None:
    """Retried in place up to three times, with exponential backoff (1 s, 2 s, 4 s)."""
    attempt(run, key, seq)
    record(run, key, seq, sleep)


@ordered_task(key="key", bind=True, ignore_result=True, max_retries=5)
def self_retry_step(self: Any, run: str, key: Any, seq: int) -> None:
    """Retries itself with ``self.retry``, like a Celery user would."""
    try:
        attempt(run, key, seq)
    except Boom as exc:
        raise self.retry(exc=exc, countdown=0.5) from exc
    recorder().rpush(f"{run}:retries:{key}", self.request.retries)
    record(run, key, seq, 0.0)


@ordered_task(key="key", ignore_result=True, failure_policy="continue")
def lenient_step(run: str, key: Any, seq: int) -> None:
    """Records its failure and lets the key go on."""
    attempt(run, key, seq)
    record(run, key, seq, 0.0)


@ordered_task(key="key", ignore_result=True)
def dying_step(run: str, key: Any, seq: int) -> None:
    """Kills its own pool process, as the kernel's OOM killer would."""
    os.kill(os.getpid(), 9)


@ordered_task(key="key", ignore_result=True, time_limit=1)
def overtime_step(run: str, key: Any, seq: int) -> None:
    """Runs past its hard time limit."""
    time.sleep(10)


@shared_task(ignore_result=True, name="events.external_step")
def external_step(run: str, key: Any, seq: int) -> None:
    """A plain task ordered by ``ROUTES``: it gets the same failure handling in ordered workers."""
    attempt(run, key, seq)
    record(run, key, seq, 0.0)


@ordered_task(key="key", ignore_result=True, autoretry_for=(Boom,), default_retry_delay=4)
def patient_step(run: str, key: Any, seq: int) -> None:
    """Retried in place after four seconds: long enough to restart the workers meanwhile."""
    attempt(run, key, seq)
    record(run, key, seq, 0.0)


@ordered_task(key="key", ignore_result=True)
def dies_once_step(run: str, key: Any, seq: int) -> None:
    """Kills its pool process on the first attempt only (a crash, not a bug)."""
    if recorder().incr(f"{run}:attempts:{key}:{seq}") == 1:
        os.kill(os.getpid(), 9)
    record(run, key, seq, 0.0)


@ordered_task(key="key", bind=True, ignore_result=True)
def rewriting_step(self: Any, run: str, key: Any, seq: int) -> None:
    """Retries twice with new arguments (``seq`` + 100 each time), as ``self.retry(kwargs=...)`` allows."""
    if self.request.retries < 2:
        raise self.retry(kwargs={"run": run, "key": key, "seq": seq + 100}, countdown=0)
    record(run, key, seq, 0.0)
import tests.testapp.nemesis_tasks  # noqa: E402, F401  (the nemesis harness tasks, in every worker)
