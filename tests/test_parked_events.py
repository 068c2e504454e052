"""A parked task gets a final state in the event stream (Flower, ``celery events``) and the result backend."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.events.state import State

from ordered_tasks import replay
from tests.conftest import eventually
from tests.services import RESULTS_URL
from tests.support.workload import T, fail, parked, ran, same_partition_keys

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("shared_db")]

#: The workers' Celery app in these tests (``--app``): the test project's, with task events on and
#: a result backend.
events_app = Celery("tests-events", set_as_current=False)
events_app.config_from_object("django.conf:settings", namespace="CELERY")
events_app.conf.update(worker_send_task_events=True, result_backend=RESULTS_URL)
events_app.autodiscover_tasks()


@pytest.fixture(autouse=True)
def control_through(app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    """replay() publishes with the project's Celery app: here, the test's broker."""
    monkeypatch.setattr("ordered_tasks.celery_app.find_celery_app", lambda _path=None: app)


@pytest.fixture
def monitor(app: Celery) -> Iterator[State]:
    """What Flower keeps: Celery's ``events.state.State``, fed by an event receiver on the broker."""
    state = State()
    receivers: list[Any] = []

    def capture() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": state.event})
            receivers.append(receiver)
            receiver.capture(limit=None, timeout=None, wakeup=False)

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    yield state
    for receiver in receivers:
        receiver.should_stop = True
    thread.join(5)


def test_a_task_parked_behind_its_blocked_key_ends_parked_not_started(
        app: Celery, start_workers: Any, monitor: State, results: redis.Redis) -> None:
    run = uuid.uuid4().hex
    key = same_partition_keys(1)[0]
    fail(results, run, key, 1)
    workers = start_workers(1, "--app", f"{__name__}:events_app")
    eventually(lambda: any(w.hostname in workers.nodes for w in monitor.workers.values()),
               what="the worker's heartbeat: the monitor receives the worker's events")
    task = app.tasks[T + "strict_step"]
    first, second = (task.apply_async(kwargs={"run": run, "key": key, "seq": seq}, ignore_result=False).id
                     for seq in (1, 2))
    eventually(lambda: first in monitor.tasks and monitor.tasks[first].state == "FAILURE",
               what="the failure event")
    eventually(lambda: second in monitor.tasks and monitor.tasks[second].state == "PARKED",
               what="the parked task's final state in the event stream")
    assert monitor.tasks[second].started  # it was started: without the event it stays STARTED
    assert "held by an earlier message" in monitor.tasks[second].reason
    assert parked(key) == [("failed", "parked"), ("key_held", "parked")]
    backend = events_app.AsyncResult(second)
    assert backend.state == "PARKED" and "held" in backend.info["reason"]
    assert events_app.AsyncResult(first).state == "FAILURE"
    results.delete(f"{run}:fail:{key}:1")
    replay(key, requested_by="test")
    eventually(lambda: ran(results, run, key) == [1, 2], what="the replay")
    deadline = time.monotonic() + 10
    while events_app.AsyncResult(second).state != "SUCCESS" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert events_app.AsyncResult(second).state == "SUCCESS"  # the replay stores the real outcome
