"""The ORDERED_TASKS setting: defaults, lazy reading and the system check."""

from __future__ import annotations

import re

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from ordered_tasks.checks import check_settings
from ordered_tasks.conf import get_settings
from ordered_tasks.exceptions import ConfigurationError


def test_defaults(settings) -> None:
    settings.ORDERED_TASKS = {}
    conf = get_settings()
    assert (conf.partitions, conf.queue_prefix, conf.routes, conf.celery_app) == (16, "ordered", (), None)
    assert check_settings() == []


def test_read_lazily_and_refreshed_on_change(settings) -> None:
    settings.ORDERED_TASKS = {"PARTITIONS": 3}
    assert get_settings().partitions == 3
    settings.ORDERED_TASKS = {"PARTITIONS": 5}
    assert get_settings().partitions == 5


@pytest.mark.parametrize(
    ("value", "check_id", "fragment"),
    [
        ({"PARTITIONS": 0}, "ordered_tasks.E003", "whole number from 1 to 4096"),
        ({"PARTITIONS": -3}, "ordered_tasks.E003", "whole number"),
        ({"PARTITIONS": "16"}, "ordered_tasks.E003", "whole number"),
        ({"PARTITIONS": True}, "ordered_tasks.E003", "whole number"),
        ({"QUEUE_PREFIX": ""}, "ordered_tasks.E004", "letters, digits"),
        ({"QUEUE_PREFIX": "a b"}, "ordered_tasks.E004", "letters, digits"),
        ({"QUEUE_PREFIX": "ordered."}, "ordered_tasks.E004", "inner dots"),
        ({"PARTITONS": 4}, "ordered_tasks.E002", "unknown keys: PARTITONS"),
        ({"ROUTES": ["a.*"]}, "ordered_tasks.E005", "task-name patterns"),
        ({"ROUTES": {"a.*": "not an identifier"}}, "ordered_tasks.E005", "keyword name"),
        ({"ROUTES": {"a.*": -1}}, "ordered_tasks.E005", "positional index"),
        ({"CELERY_APP": 3}, "ordered_tasks.E006", "dotted path"),
        ({"REDIS_URL": "amqp://localhost"}, "ordered_tasks.E007", "Redis URL"),
        ({"METRICS_PORT": 0}, "ordered_tasks.E009", "TCP port from 1 to 65535"),
        ({"METRICS_PORT": 70000}, "ordered_tasks.E009", "METRICS_PORT + i"),
        ({"METRICS_PORT": "9100"}, "ordered_tasks.E009", "TCP port"),
        ({"METRICS_PORT": True}, "ordered_tasks.E009", "TCP port"),
        ("16", "ordered_tasks.E001", "must be a dict"),
    ],
)
def test_system_check_reports_bad_values(settings, value, check_id, fragment) -> None:
    settings.ORDERED_TASKS = value
    errors = check_settings()
    assert [e.id for e in errors] == [check_id]
    assert fragment in errors[0].msg + errors[0].hint
    with pytest.raises(ConfigurationError):
        get_settings()


def test_check_runs_through_manage_py_check(settings) -> None:
    settings.ORDERED_TASKS = {"PARTITIONS": 0}
    with pytest.raises(SystemCheckError, match=r"ordered_tasks\.E003"):
        call_command("check")


def test_metrics_port_is_off_by_default_and_read_when_set(settings) -> None:
    settings.ORDERED_TASKS = {}
    assert get_settings().metrics_port is None
    settings.ORDERED_TASKS = {"METRICS_PORT": 9100}
    assert get_settings().metrics_port == 9100
    assert check_settings() == []


def test_routes_compile_globs_and_regexes(settings) -> None:
    settings.ORDERED_TASKS = {"ROUTES": {"billing.*": "account_id", re.compile(r"^crm\.(a|b)$"): 0}}
    conf = get_settings()
    assert conf.route_key_for("billing.tasks.charge") == "account_id"
    assert conf.route_key_for("crm.a") == 0
    assert conf.route_key_for("crm.c") is None


def test_partition_of_queue(settings) -> None:
    settings.ORDERED_TASKS = {"PARTITIONS": 4, "QUEUE_PREFIX": "o.x"}
    conf = get_settings()
    assert [conf.partition_of_queue(q) for q in ("o.x.0", "o.x.3", "o.x.4", "o.x.01", "o.x", "celery")] == [
        0, 3, None, None, None, None]


def test_coordination_redis_is_the_setting_else_a_redis_broker() -> None:
    from ordered_tasks.conf import build

    assert build({}).coordination_url("redis://h:6379/1") == "redis://h:6379/1"
    assert build({}).coordination_url("amqp://guest@h//") is None
    assert build({"REDIS_URL": "redis://r/2"}).coordination_url("amqp://guest@h//") == "redis://r/2"


def test_a_coordination_redis_that_does_not_answer_fails_a_command_instead_of_hanging(
        settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen Redis (here: a socket that accepts and never answers) must not hold a worker for good."""
    import socket
    import time

    import redis
    from celery import Celery

    from ordered_tasks import coordination

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    monkeypatch.setattr(coordination, "COORDINATION_TIMEOUT", 0.5)
    settings.ORDERED_TASKS = {"REDIS_URL": f"redis://127.0.0.1:{listener.getsockname()[1]}/0"}
    app = Celery("frozen", set_as_current=False)
    app.conf.broker_url = "amqp://guest@127.0.0.1//"
    client = coordination.coordination_client(app)
    assert client is not None
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        client.set("k", "v")
    assert time.monotonic() - started < 5
    listener.close()
