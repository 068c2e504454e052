"""Tasks of the nemesis harness: each execution records its start and end, with its pid, in Redis."""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from ordered_tasks import ordered_task
from tests.testapp.tasks import recorder

STEP = "tests.nemesis.step"
SELF_RETRY_STEP = "tests.nemesis.self_retry_step"


class Flaky(Exception):
    """The failure the harness asks for (a few times, or until the poison flag is cleared)."""


def events_key(run: str) -> str:
    """The Redis list of the run's execution events."""
    return f"{run}:ev"


def poison_key(run: str, key: str, seq: int, link: int) -> str:
    """While this Redis key exists, the message fails every attempt (it blocks its key)."""
    return f"{run}:poison:{key}:{seq}:{link}"


def _note(run: str, event: dict[str, Any]) -> None:
    recorder().rpush(events_key(run), json.dumps(event))


def _execute(request: Any, run: str, key: str, seq: int, link: int, sleep: float, fail: int) -> None:
    """Record a start, sleep, maybe fail on purpose, record the end with its outcome."""
    execution = uuid.uuid4().hex
    common = {"x": execution, "key": key, "seq": seq, "link": link, "id": request.id, "pid": os.getpid()}
    _note(run, {**common, "ev": "start", "t": time.time(), "sleep": sleep, "retries": request.retries})
    outcome = "ok"
    try:
        if sleep:
            time.sleep(sleep)
        if (request.retries or 0) < fail or recorder().exists(poison_key(run, key, seq, link)):
            outcome = "fail"
            raise Flaky(f"{key}#{seq}.{link} fails on purpose (attempt {request.retries})")
    finally:
        _note(run, {**common, "ev": "end", "t": time.time(), "outcome": outcome})


@ordered_task(key="key", bind=True, ignore_result=True, name=STEP, autoretry_for=(Flaky,), max_retries=3,
              retry_backoff=1, retry_jitter=False)
def step(self: Any, run: str, key: str, seq: int, link: int = 0, sleep: float = 0.0, fail: int = 0) -> None:
    """Fails its first ``fail`` attempts (retried in place with backoff 1, 2, 4 s), then succeeds."""
    _execute(self.request, run, key, seq, link, sleep, fail)


@ordered_task(key="key", bind=True, ignore_result=True, name=SELF_RETRY_STEP, max_retries=4)
def self_retry_step(self: Any, run: str, key: str, seq: int, link: int = 0, sleep: float = 0.0,
                    fail: int = 0) -> None:
    """Like ``step``, but retries itself with ``self.retry`` after half a second."""
    try:
        _execute(self.request, run, key, seq, link, sleep, fail)
    except Flaky as exc:
        raise self.retry(exc=exc, countdown=0.5) from exc
