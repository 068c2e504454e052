"""Worker launch options: partition selection, refused Celery flags, the command's errors."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import CommandError, call_command

from ordered_tasks.exceptions import UnsafeWorkerOptionError
from ordered_tasks.management.commands.ordered_worker import Command
from ordered_tasks.worker.launch.child import worker_argv
from ordered_tasks.worker.launch.options import (
    check_celery_args,
    child_hostname,
    parse_partitions,
    split_partitions,
)


def test_parse_partitions() -> None:
    assert parse_partitions(None, 4) == [0, 1, 2, 3]
    assert parse_partitions("0-2,7, 5", 8) == [0, 1, 2, 5, 7]
    assert parse_partitions("3,3,1-3", 8) == [1, 2, 3]


@pytest.mark.parametrize("spec", ["8", "0-8", "x", "3-1", "-1", "1-", ""])
def test_parse_partitions_refuses(spec: str) -> None:
    if spec == "":
        assert parse_partitions(spec, 8) == list(range(8))
        return
    with pytest.raises(UnsafeWorkerOptionError):
        parse_partitions(spec, 8)


def test_split_round_robin() -> None:
    assert split_partitions([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    with pytest.raises(UnsafeWorkerOptionError, match="more than the 2 partitions"):
        split_partitions([0, 1], 3)
    with pytest.raises(UnsafeWorkerOptionError):
        split_partitions([0, 1], 0)


@pytest.mark.parametrize("arg", ["-c", "-c4", "--concurrency=4", "--autoscale", "--prefetch-multiplier=4",
                                 "-Q", "--queues", "-P", "--pool=gevent", "-B", "--purge", "--detach",
                                 "-Ofair", "--pidfile=/run/x.pid"])
def test_refused_celery_flags(arg: str) -> None:
    with pytest.raises(UnsafeWorkerOptionError, match="does not accept the Celery option"):
        check_celery_args(["--loglevel", "INFO", arg])


def test_safe_celery_flags_pass() -> None:
    check_celery_args(["--loglevel", "INFO", "-l", "DEBUG", "-E", "--without-gossip", "--max-tasks-per-child=50",
                       "--time-limit", "300"])


def test_hostnames() -> None:
    assert child_hostname("ordered@%h", 3) == "ordered-3@%h"
    assert child_hostname("billing", 0) == "billing-0@%h"


def test_worker_argv_sets_the_pool_size_and_prefetch() -> None:
    argv = worker_argv(["o.1", "o.3"], "prefork", "x-0@%h", ["-l", "INFO"])
    assert argv[:9] == ["worker", "--queues", "o.1,o.3", "--concurrency", "1", "--prefetch-multiplier", "1",
                        "--pool", "prefork"]
    assert argv[-2:] == ["-l", "INFO"]
    assert worker_argv(["o.1"], "solo", "x", ["-q", "-E"])[:2] == ["-q", "worker"]
    assert worker_argv(["o.1"], "prefork", "x", [], concurrency=3)[3:5] == ["--concurrency", "3"]


def test_plan_splits_partitions_over_processes(settings) -> None:
    settings.ORDERED_TASKS = {"PARTITIONS": 6}
    children = Command().plan({"celery_args": ["-l", "INFO"], "partitions": "0-4", "processes": 2,
                               "hostname": "o@%h", "pool": "threads", "app": None})
    assert [c.name for c in children] == ["o-0@%h", "o-1@%h"]
    first = children[0].argv
    assert first[first.index("--partitions") + 1] == "0,2,4"
    assert first[first.index("--pool") + 1] == "threads"
    assert first[-3:] == ["--", "-l", "INFO"]
    assert first[first.index("--concurrency") + 1] == "1"
    pooled = Command().plan({"celery_args": [], "partitions": None, "processes": 2, "concurrency": 3,
                             "hostname": "o@%h", "pool": "prefork", "app": None})
    assert [c.argv[c.argv.index("--concurrency") + 1] for c in pooled] == ["3", "3"]
    # The pool no longer depends on the partitions: 32 threads for the 4 partitions of each worker.
    threads = Command().plan({"celery_args": [], "partitions": None, "processes": 2, "concurrency": 32,
                              "hostname": "o@%h", "pool": "threads", "app": None})
    assert [c.argv[c.argv.index("--concurrency") + 1] for c in threads] == ["32", "32"]


def test_the_default_number_of_workers_counts_prefork_pool_processes_as_cores(
        settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.ORDERED_TASKS = {"PARTITIONS": 16}
    monkeypatch.setattr("os.cpu_count", lambda: 4)

    def workers(pool: str, concurrency: int) -> int:
        return len(Command().plan({"celery_args": [], "partitions": None, "processes": None,
                                   "concurrency": concurrency, "hostname": "o@%h", "pool": pool,
                                   "app": None}))

    assert workers("prefork", 1) == 4
    assert workers("prefork", 2) == 2
    assert workers("prefork", 8) == 1
    assert workers("threads", 32) == 4


@pytest.mark.parametrize(("argv", "message"), [
    (["--processes", "9"], "more than the 8 partitions"),
    (["--partitions", "0-9"], "outside 0-7"),
    (["--", "--concurrency", "8"], "launcher's own --concurrency"),
    (["--concurrency", "0"], "at least 1"),
    (["--pool", "solo", "--concurrency", "2"], "needs a pool"),
])
def test_command_refuses_unsafe_options(argv: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("ordered_worker", *argv)


def test_worker_refuses_an_ordered_task_acknowledged_early_and_guards_routed_tasks() -> None:
    from celery import Celery

    from ordered_tasks.task import GuardedTaskMixin
    from ordered_tasks.worker.launch.child import check_tasks

    app = Celery("check-tasks", set_as_current=False)
    app.conf.task_acks_late = True  # as configure() sets it

    @app.task(name="events.routed_plain")
    def routed(key: str) -> None: ...

    @app.task(name="unrelated.plain")
    def unrelated(key: str) -> None: ...

    check_tasks(app)
    assert isinstance(app.tasks["events.routed_plain"], GuardedTaskMixin)
    assert app.tasks["events.routed_plain"].failure_policy == "block"
    assert not isinstance(app.tasks["unrelated.plain"], GuardedTaskMixin)

    # A routed task's own failure policy and retry delay are kept; the guard's fill in the rest.
    @app.task(name="events.lenient_plain", failure_policy="continue", default_retry_delay=30)
    def lenient(key: str) -> None: ...

    check_tasks(app)
    assert isinstance(app.tasks["events.lenient_plain"], GuardedTaskMixin)
    assert app.tasks["events.lenient_plain"].failure_policy == "continue"
    assert app.tasks["events.lenient_plain"].default_retry_delay == 30
    assert app.tasks["events.routed_plain"].default_retry_delay == GuardedTaskMixin.default_retry_delay

    @app.task(name="events.early", acks_late=False)
    def early(key: str) -> None: ...

    with pytest.raises(UnsafeWorkerOptionError, match="acks_late=False"):
        check_tasks(app)


@pytest.mark.integration
def test_a_plain_celery_worker_refuses_partition_queues(redis_broker: str) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from ordered_tasks import queue_for

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TEST_BROKER_URL": redis_broker, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.testapp.celery:app", "worker", "--pool", "solo",
         "-Q", f"other,{queue_for('k')}", "--without-mingle", "--without-gossip"],
        cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "not started by 'manage.py ordered_worker'" in done.stderr + done.stdout


def test_an_ordered_worker_refuses_more_than_one_task_at_a_time() -> None:
    from types import SimpleNamespace

    from celery import Celery

    from ordered_tasks import queue_for
    from ordered_tasks.worker.launch.startup import RefuseUnsafeConsumers
    from ordered_tasks.worker.setup import ORDERED_WORKERS, OrderedWorker

    app = Celery("refuse-concurrency", set_as_current=False)
    app.amqp.queues.select_add(queue_for("k"))
    ORDERED_WORKERS[app] = OrderedWorker([0])
    app.conf.worker_prefetch_multiplier = 1
    RefuseUnsafeConsumers(SimpleNamespace(app=app, concurrency=1))
    with pytest.raises(UnsafeWorkerOptionError, match="concurrency 4"):
        RefuseUnsafeConsumers(SimpleNamespace(app=app, concurrency=4))
    ORDERED_WORKERS[app].concurrency = 4  # ordered_worker --concurrency 4
    RefuseUnsafeConsumers(SimpleNamespace(app=app, concurrency=4))
    with pytest.raises(UnsafeWorkerOptionError, match="concurrency 1"):
        RefuseUnsafeConsumers(SimpleNamespace(app=app, concurrency=1))
    ORDERED_WORKERS[app].concurrency = 1
    app.conf.worker_prefetch_multiplier = 4
    with pytest.raises(UnsafeWorkerOptionError, match="prefetch multiplier 4"):
        RefuseUnsafeConsumers(SimpleNamespace(app=app, concurrency=1))


def test_a_plain_worker_of_a_project_with_ordered_tasks_says_they_will_wait(
        caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from celery import Celery

    from ordered_tasks.worker.launch.startup import RefuseUnsafeConsumers
    from ordered_tasks.worker.setup import ORDERED_WORKERS, OrderedWorker

    app = Celery("plain-habit", set_as_current=False)  # gets the project's shared and ordered tasks
    app.conf.task_queues = ()
    app.finalize(auto=True)
    ORDERED_WORKERS[app] = OrderedWorker([0])  # an ordered worker with nothing to consume yet says nothing
    RefuseUnsafeConsumers(SimpleNamespace(app=app, concurrency=1))
    assert "consumes no partition queue" not in caplog.text
    del ORDERED_WORKERS[app]
    RefuseUnsafeConsumers(SimpleNamespace(app=app, concurrency=4))
    assert "consumes no partition queue" in caplog.text
    assert "events.external_record" in caplog.text and "ordered_worker" in caplog.text
