"""Celery beat publishes periodic ordered tasks through the app: partition queue and ordered headers."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import celery as _celery
import pytest
from celery import Celery
from celery.beat import Scheduler
from django.utils import timezone

from ordered_tasks import partition_for
from ordered_tasks.options import KEY_HEADER, PARTITION_HEADER, PUBLISHED_HEADER
from tests.conftest import ordered_queues
from tests.test_publish import take_all

pytestmark = pytest.mark.integration
CELERY_VERSION = tuple(int(part) for part in _celery.__version__.split(".")[:2])

ORDERED = "tests.testapp.tasks.ordered_record"


def where(app: Celery) -> dict[int, list[Any]]:
    """Messages by partition, taken off the ordered queues."""
    return {number: messages for number, queue in enumerate(ordered_queues())
            if (messages := take_all(app, queue.name))}


def run_beat(app: Celery, schedule: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``celery beat`` does with ``beat_schedule`` once every entry is due: one tick per entry."""
    monkeypatch.setitem(app.conf, "beat_schedule", schedule)
    scheduler = Scheduler(app=app)
    try:
        for name in schedule:  # last run a day ago: due at the first tick
            scheduler.schedule[name].last_run_at = timezone.now() - timedelta(days=1)
        for _ in range(len(schedule)):
            assert scheduler.tick() == 0, "an entry was not due"
    finally:
        scheduler.connection.close()


def assert_ordered(message: Any, key: str, task: str) -> None:
    headers = message.headers
    assert headers["task"] == task
    assert headers[KEY_HEADER] == key
    assert headers[PARTITION_HEADER] == partition_for(key)
    assert isinstance(headers[PUBLISHED_HEADER], float)
    if CELERY_VERSION >= (5, 7):  # beat marks its messages since Celery 5.7
        assert headers["celery_beat_task"] is True  # beat's own header survives next to ours
    assert message.delivery_info["routing_key"] == ordered_queues()[partition_for(key)].name


def test_beat_publishes_a_registered_ordered_task_to_its_keys_partition(
        app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    run_beat(app, {
        "nightly-report": {"task": ORDERED, "schedule": timedelta(minutes=5),
                           "kwargs": {"run": "beat", "key": "report:nightly", "seq": 1}},
        "by-position": {"task": ORDERED, "schedule": 60.0, "args": ("beat", "acct-42", 2)},
    }, monkeypatch)
    found = where(app)
    assert sorted(found) == sorted({partition_for("report:nightly"), partition_for("acct-42")})
    by_key = {m.headers[KEY_HEADER]: m for messages in found.values() for m in messages}
    assert_ordered(by_key["report:nightly"], "report:nightly", ORDERED)
    assert_ordered(by_key["acct-42"], "acct-42", ORDERED)
    assert by_key["report:nightly"].payload[1] == {"run": "beat", "key": "report:nightly", "seq": 1}


def test_beat_publishes_by_name_a_task_it_does_not_have_through_routes(
        app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "events.beat_only" not in app.tasks  # beat calls app.send_task: ROUTES give the key
    run_beat(app, {"sync": {"task": "events.beat_only", "schedule": 30.0,
                            "kwargs": {"run": "beat", "key": 7, "seq": 1}}}, monkeypatch)
    found = where(app)
    assert list(found) == [partition_for("7")] and len(found[partition_for("7")]) == 1
    assert_ordered(found[partition_for("7")][0], "7", "events.beat_only")


@pytest.mark.parametrize("options", [{"expires": 30}, {"queue": "periodic"}, {"priority": 5}])
def test_beat_options_that_break_ordering_are_refused_and_logged(
        app: Celery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        options: dict[str, Any]) -> None:
    with caplog.at_level(logging.ERROR, logger="celery.beat"):
        run_beat(app, {"bad": {"task": ORDERED, "schedule": 30.0, "options": options,
                               "kwargs": {"run": "beat", "key": "k", "seq": 1}}}, monkeypatch)
    assert where(app) == {}
    name = next(iter(options))
    assert any("Couldn't apply scheduled task bad" in r.getMessage() and f"{name}=" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
