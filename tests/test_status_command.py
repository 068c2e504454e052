"""``manage.py ordered_status``: partitions, held keys, one key, the JSON document and the exit status."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from datetime import datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from celery import Celery
from django.core.management import CommandError, call_command
from django.utils import timezone

from ordered_tasks import partition_for
from ordered_tasks.conf import get_settings
from ordered_tasks.management.commands.ordered_status import Unhealthy
from ordered_tasks.models import AccountState, ParkedMessage, PartitionStatus
from tests.conftest import ROOT
from tests.services import require

pytestmark = pytest.mark.django_db

DOWN = ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1//"]


@pytest.fixture
def figures(app: Celery, broker: str, monkeypatch: pytest.MonkeyPatch) -> Celery:
    """The command asks the test's broker (empty partition queues) for queue figures."""
    from ordered_tasks import dashboard

    monkeypatch.setattr(dashboard, "broker_url", lambda: broker)
    return app


def status(*args: str, **options: Any) -> tuple[int, str]:
    """Run the command as ``call_command`` does; return its exit status and what it printed."""
    out = StringIO()
    try:
        call_command("ordered_status", *args, stdout=out, **options)
    except Unhealthy as exc:
        return exc.returncode, out.getvalue()
    return 0, out.getvalue()


def document(*args: str) -> tuple[int, dict[str, Any]]:
    code, out = status("--json", *args)
    return code, json.loads(out)


def held(key: str, status: str, *, head_error: str = "", last_error: str = "", parked: int = 0) -> AccountState:
    """A key's state and its parked messages, as a worker leaves them (the first one failed)."""
    now = timezone.now()
    state = AccountState.objects.create(
        key=key, partition=partition_for(key), status=status, last_error=last_error or head_error,
        last_error_at=now, sequence=parked, blocked_at=now if status == "blocked" else None,
        retry_at=now + timedelta(seconds=30) if status == "retrying" else None)
    for position in range(1, parked + 1):
        park(key, position, reason=("retrying" if status == "retrying" else "failed") if position == 1
             else "key_held", error=head_error if position == 1 else "")
    return state


def park(key: str, position: int, *, reason: str = "key_held", error: str = "", task: str = "accounts.apply",
         state: str = "parked") -> ParkedMessage:
    body = json.dumps([[], {"account": key, "step": position}, {}]).encode()
    return ParkedMessage.objects.create(
        key=key, partition=partition_for(key), position=position, state=state, reason=reason, task_name=task,
        task_id=str(uuid.uuid4()), body=body, content_type="application/json", content_encoding="utf-8",
        exception=error, attempts=1 if error else 0)


def other_partition(key: str, *taken: int) -> str:
    """A key whose partition differs from those of ``key`` and ``taken``."""
    candidate = key
    while partition_for(candidate) in {partition_for(key), *taken}:
        candidate += "x"
    return candidate


def publish(app: Celery, key: str, count: int) -> None:
    from tests.testapp.tasks import ordered_record

    for seq in range(count):
        app.tasks[ordered_record.name].apply_async(kwargs={"run": "status", "key": key, "seq": seq})


def line_of(out: str, text: str) -> str:
    lines = [line for line in out.splitlines() if text in line]
    assert len(lines) == 1, f"expected one line with {text!r} in:\n{out}"
    return lines[0]


def test_healthy_exits_0_and_lists_every_partition_and_the_retrying_keys(figures: Celery) -> None:
    retrying = held("acct-retrying", "retrying", head_error="ConnectionError: bank down", parked=1)
    held("acct-active", "active")
    PartitionStatus.objects.create(partition=retrying.partition, worker="w1@host", heartbeat_at=timezone.now(),
                                   consumer_since=timezone.now(), progress_at=timezone.now(), per_minute=12.5,
                                   completed=40, failed=2)
    code, out = status()
    assert code == 0
    assert out.rstrip().endswith("Status: healthy (exit status 0): no key blocked, no partition stalled.")
    partitions = get_settings().partitions
    queues = [line for line in out.splitlines() if f"{get_settings().queue_prefix}." in line]
    assert len(queues) == partitions
    owned = line_of(out, "w1@host")
    assert owned.split()[0] == str(retrying.partition) and "12.5" in owned and owned.endswith("ok")
    assert "Held keys: 0 blocked, 1 retrying." in out
    assert "ConnectionError: bank down" in line_of(out, "acct-retrying")
    assert "acct-active" not in out  # an active key is not held

    code, doc = document()
    assert code == 0 and doc["status"] == "healthy" and doc["exit_code"] == 0
    assert [p["partition"] for p in doc["partitions"]] == list(range(partitions))
    assert all(p["depth"] == 0 and not p["stalled"] for p in doc["partitions"])
    entry = doc["partitions"][retrying.partition]
    assert (entry["owner"], entry["per_minute"], entry["completed"], entry["failed"]) == ("w1@host", 12.5, 40, 2)
    assert entry["retrying"] == 1 and entry["report_age"] is not None and entry["report_age"] < 60
    assert [(k["key"], k["status"], k["error"]) for k in doc["keys"]] == [
        ("acct-retrying", "retrying", "ConnectionError: bank down")]
    assert doc["broker"] == {"reachable": True, "error": None}


def test_a_blocked_key_exits_3_and_is_listed_first_with_its_first_error(figures: Celery) -> None:
    held("acct-retrying", "retrying", head_error="ConnectionError: bank down", parked=1)
    blocked = held("acct-blocked", "blocked", head_error="ValueError: balance would go negative\nmore detail",
                   last_error="RuntimeError: a later attempt", parked=3)
    code, out = status()
    assert code == 3
    assert "Held keys: 1 blocked, 1 retrying." in out
    row = line_of(out, "acct-blocked")
    # The error of the message that holds the key (its first parked message), first line only.
    assert row.endswith("ValueError: balance would go negative")
    assert row.split()[:4] == ["blocked", "acct-blocked", str(blocked.partition), "3"]
    assert out.index("acct-blocked") < out.index("acct-retrying")
    assert "Status: blocked (exit status 3): 1 key blocked." in out

    with pytest.raises(Unhealthy, match=r"1 key blocked \(exit status 3\)"):
        call_command("ordered_status", stdout=StringIO())
    _, doc = document()
    assert doc["status"] == "blocked" and doc["counts"] == {"blocked": 1, "retrying": 1, "stalled": []}
    first = doc["keys"][0]
    assert (first["key"], first["reason"], first["parked"]) == ("acct-blocked", "failed", 3)
    assert first["error"] == "ValueError: balance would go negative"
    assert first["blocked_at"] is not None and first["retry_at"] is None
    assert doc["partitions"][blocked.partition]["blocked"] == 1


def test_key_shows_its_partition_state_and_parked_messages_in_order(figures: Celery) -> None:
    key = "acct-42"
    AccountState.objects.create(key=key, partition=partition_for(key), status="blocked", sequence=4,
                                last_error="ValueError: first", blocked_at=timezone.now())
    # Written out of order: the listing follows the position, not the insertion.
    third = park(key, 3, task="step.three")
    first = park(key, 1, reason="failed", error="ValueError: first", task="step.one")
    park(key, 4, task="step.four", state="skipped")
    second = park(key, 2, task="step.two")
    park(other_partition(key), 1, reason="failed", error="KeyError: not this key", task="step.other")

    code, out = status("--key", key)
    assert code == 3
    assert out.startswith(f"Key {key}: blocked, partition {partition_for(key)}, 3 parked messages.\n"
                          "Error: ValueError: first\n")
    steps = [out.index(name) for name in ("step.one", "step.two", "step.three", "step.four")]
    assert steps == sorted(steps)
    assert "step.other" not in out and "KeyError" not in out
    assert line_of(out, "step.one").split()[:3] == ["1", "parked", "failed"]
    assert first.task_id in line_of(out, "step.one")
    assert line_of(out, "step.four").split()[:3] == ["4", "skipped", "key_held"]
    tables = [line for line in out.splitlines() if f"{get_settings().queue_prefix}." in line]
    assert len(tables) == 1 and tables[0].split()[0] == str(partition_for(key))

    code, doc = document("--key", key)
    assert code == 3 and doc["scope"] == {"partition": None, "key": key}
    assert [p["partition"] for p in doc["partitions"]] == [partition_for(key)]
    assert [(m["position"], m["task_name"], m["task_id"], m["state"]) for m in doc["messages"]] == [
        (1, "step.one", first.task_id, "parked"), (2, "step.two", second.task_id, "parked"),
        (3, "step.three", third.task_id, "parked"), (4, "step.four", doc["messages"][3]["task_id"], "skipped")]
    assert doc["messages"][0]["error"] == "ValueError: first" and doc["messages"][1]["error"] == ""
    assert datetime.fromisoformat(doc["messages"][0]["parked_at"]) == first.created_at
    assert [(k["key"], k["status"], k["parked"]) for k in doc["keys"]] == [(key, "blocked", 3)]


def test_a_key_that_never_failed_is_active_and_wrong_keys_are_refused(figures: Celery) -> None:
    code, out = status("--key", "never-failed")
    assert code == 0
    assert out.startswith(f"Key never-failed: active, partition {partition_for('never-failed')}, 0 parked ")
    assert "No parked message." in out
    _, doc = document("--key", "never-failed")
    assert doc["messages"] == [] and doc["keys"][0]["status"] == "active"
    with pytest.raises(CommandError, match="empty string") as raised:
        call_command("ordered_status", key="", stdout=StringIO())
    assert not isinstance(raised.value, Unhealthy) and raised.value.returncode == 1
    with pytest.raises(CommandError, match="at most 255 are allowed"):
        call_command("ordered_status", key="k" * 256, stdout=StringIO())


def test_partition_shows_only_that_partition_and_its_keys(figures: Celery) -> None:
    here = held("acct-here", "blocked", head_error="ValueError: here", parked=1)
    there = held(other_partition("acct-here"), "blocked", head_error="ValueError: there", parked=1)
    quiet = partition_for(other_partition("acct-here", there.partition))

    code, out = status("--partition", str(here.partition))
    assert code == 3
    assert "acct-here" in out and there.key not in out and "ValueError: there" not in out
    tables = [line for line in out.splitlines() if f"{get_settings().queue_prefix}." in line]
    assert [line.split()[0] for line in tables] == [str(here.partition)]
    code, doc = document("--partition", str(here.partition))
    assert [p["partition"] for p in doc["partitions"]] == [here.partition]
    assert [k["key"] for k in doc["keys"]] == ["acct-here"] and doc["scope"]["partition"] == here.partition
    # The exit status answers for the partition asked about only.
    code, doc = document("--partition", str(quiet))
    assert code == 0 and doc["keys"] == [] and doc["status"] == "healthy"


@pytest.mark.parametrize("past_the_last", [False, True])
def test_a_partition_that_does_not_exist_is_refused(figures: Celery, past_the_last: bool) -> None:
    partitions = get_settings().partitions
    number = partitions if past_the_last else -1
    with pytest.raises(CommandError, match=rf"no partition {number}: .*numbered 0 to {partitions - 1}\.") as raised:
        call_command("ordered_status", "--partition", str(number), stdout=StringIO())
    assert not isinstance(raised.value, Unhealthy) and raised.value.returncode == 1


def test_partition_and_key_together_are_refused(figures: Celery) -> None:
    with pytest.raises(CommandError, match="not both"):
        call_command("ordered_status", partition=0, key="acct-1", stdout=StringIO())


def test_the_json_document_has_its_documented_fields(figures: Celery) -> None:
    key = "acct-json"
    held(key, "blocked", head_error="ValueError: boom", parked=2)
    _, doc = document()
    assert list(doc) == ["version", "checked_at", "status", "exit_code", "summary", "scope", "broker", "counts",
                         "partitions", "keys", "messages"]
    assert doc["version"] == 1 and doc["messages"] is None
    assert abs((datetime.fromisoformat(doc["checked_at"]) - timezone.now()).total_seconds()) < 60
    assert doc["scope"] == {"partition": None, "key": None}
    assert set(doc["partitions"][0]) == {
        "partition", "queue", "owner", "owner_since", "report_age", "silent", "depth", "oldest_age",
        "oldest_is_estimate", "per_minute", "completed", "failed", "running", "quiet_for", "blocked",
        "retrying", "stalled", "stall_reason"}
    assert set(doc["keys"][0]) == {"key", "partition", "status", "parked", "reason", "error", "error_at",
                                   "blocked_at", "retry_at"}
    _, one = document("--key", key)
    assert set(one["messages"][0]) == {"position", "state", "reason", "task_name", "task_id", "parked_at",
                                       "due_at", "attempts", "error"}
    assert set(one) == set(doc)


def test_a_stalled_partition_exits_4_before_a_blocked_key(figures: Celery) -> None:
    key = "acct-stalled"
    partition = partition_for(key)
    held(other_partition(key), "blocked", head_error="ValueError: elsewhere", parked=1)
    publish(figures, key, 2)
    long_ago = timezone.now() - timedelta(minutes=2)
    PartitionStatus.objects.create(partition=partition, worker="w1@host", heartbeat_at=timezone.now(),
                                   consumer_since=long_ago, progress_at=long_ago, last_wait=3.0)
    code, out = status()
    assert code == 4
    assert re.search(r"  stalled: nothing moved for 12\d s$", line_of(out, "w1@host"))
    assert f"Status: stalled (exit status 4): partition {partition} stalled." in out
    _, doc = document()
    entry = doc["partitions"][partition]
    assert entry["depth"] == 2 and entry["stalled"] and doc["counts"]["stalled"] == [partition]
    assert entry["oldest_age"] is not None
    assert sum(p["stalled"] for p in doc["partitions"]) == 1

    # The same messages while the partition moves: not stalled, only the blocked key remains.
    PartitionStatus.objects.filter(partition=partition).update(progress_at=timezone.now())
    assert status()[0] == 3
    # Messages wait and no consumer ever reported: stalled too.
    PartitionStatus.objects.filter(partition=partition).delete()
    code, doc = document()
    assert code == 4 and doc["partitions"][partition]["stall_reason"] == "no consumer has reported"
    # Its consumer stopped reporting a while ago (a dead owner that was running a task).
    PartitionStatus.objects.create(partition=partition, worker="w1@host", heartbeat_at=long_ago,
                                   running_task="accounts.apply", running_since=long_ago)
    code, doc = document()
    assert code == 4 and re.fullmatch(r"its consumer has not reported for 12\d s",
                                      doc["partitions"][partition]["stall_reason"])


@pytest.mark.parametrize("down", DOWN)
def test_an_unreachable_broker_is_reported_with_exit_5(monkeypatch: pytest.MonkeyPatch, down: str) -> None:
    from ordered_tasks import dashboard

    monkeypatch.setattr(dashboard, "broker_url", lambda: down)
    held("acct-blocked", "blocked", head_error="ValueError: boom", parked=1)
    code, out = status()
    assert code == 5
    assert out.startswith("Broker: cannot be reached, so queue depths are unknown: ")
    assert "acct-blocked" in out  # what the database knows is still shown
    assert "Status: broker_unreachable (exit status 5): the broker cannot be reached: " in out
    _, doc = document()
    assert doc["broker"]["reachable"] is False and doc["broker"]["error"]
    assert all(p["depth"] is None and not p["stalled"] for p in doc["partitions"])
    assert doc["counts"]["blocked"] == 1


def _cli(*args: str, broker: str) -> subprocess.CompletedProcess[str]:
    from django.db import connection

    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT),
           "TEST_BROKER_URL": broker, "TEST_DB_NAME": str(connection.settings_dict["NAME"])}
    return subprocess.run([sys.executable, "-m", "django", "ordered_status", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_from_the_command_line_exit_statuses_come_without_a_traceback() -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        require("postgresql://127.0.0.1:5432", 5432, "PostgreSQL (shared with the command's process)")
        pytest.skip("another process cannot open an in-memory SQLite test database")
    down = _cli(broker=DOWN[0])
    assert down.returncode == 5, down.stderr
    assert "Traceback" not in down.stderr
    assert "Unhealthy: the broker cannot be reached" in down.stderr
    assert "Broker: cannot be reached" in down.stdout
    wrong = _cli("--partition", "99", broker=DOWN[0])
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "CommandError: There is no partition 99" in wrong.stderr


def test_a_database_that_does_not_answer_is_an_error_without_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import OperationalError

    from ordered_tasks.management.commands import ordered_status

    def fail(now: Any = None) -> Any:
        raise OperationalError("connection refused")

    monkeypatch.setattr(ordered_status, "overview", fail)
    with pytest.raises(CommandError, match=r"Could not read the ordered_tasks tables .*connection refused") as raised:
        call_command("ordered_status", stdout=StringIO())
    assert not isinstance(raised.value, Unhealthy) and raised.value.returncode == 1
