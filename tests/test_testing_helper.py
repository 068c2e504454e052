"""The testing helper runs ordered tasks without a broker, as a worker; test_docs_* are its docs' examples."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import celery
import pytest
from celery import chain
from django.core.management import call_command
from django.test import TestCase
from django.urls import reverse
from kombu.exceptions import EncodeError

import ordered_tasks
from ordered_tasks import UnknownKeyError, partition_for
from ordered_tasks.exceptions import OrderedTaskError, RunnerError
from ordered_tasks.models import AccountState, ControlRequest, ParkedMessage
from ordered_tasks.signals import key_blocked, key_resumed
from ordered_tasks.task import GuardedTaskMixin
from tests.conftest import ROOT
from tests.testapp import testing_tasks
from tests.testapp.celery import app as celery_app
from tests.testapp.testing_tasks import (
    APPLIED,
    BROKEN,
    NOTES,
    OUTAGES,
    RETRIES_SEEN,
    apply_event,
    charge,
    note,
    notify,
    open_account,
    push_to_crm,
    routed_event,
)

if TYPE_CHECKING:
    from ordered_tasks.testing import OrderedTasksRunner

# [plugin]
pytest_plugins = ["ordered_tasks.testing"]
# [/plugin]

pytestmark = pytest.mark.skipif(
    tuple(int(part) for part in celery.__version__.split(".")[:2]) < (5, 7),
    reason="the testing helper needs Celery 5.7 or later")


@pytest.fixture(autouse=True)
def _recorded() -> Iterator[None]:
    testing_tasks.reset()
    yield
    testing_tasks.reset()


@pytest.fixture
def eager(settings: Any) -> Any:
    """The test project's Celery app in eager mode: ``CELERY_TASK_ALWAYS_EAGER = True`` in the settings."""
    settings.CELERY_TASK_ALWAYS_EAGER = True
    assert celery_app.conf.task_always_eager is True and "task_always_eager" not in celery_app.conf.changes
    return celery_app


def parked(key: object) -> list[tuple[str, str, dict[str, Any]]]:
    """The parked rows of ``key`` in their order: reason, state and the task's keyword arguments."""
    rows = ParkedMessage.objects.filter(key=str(key)).order_by("position")
    return [(row.reason, row.state, (row.arguments() or ((), {}))[1]) for row in rows]


# Order -----------------------------------------------------------------------------------------


# [order]
def test_docs_events_of_an_account_run_in_publish_order(ordered_tasks_runner):
    apply_event.delay(account_id=1, seq=1)
    apply_event.delay(account_id=2, seq=1)
    apply_event.delay(account_id=1, seq=2)
    assert APPLIED == []  # published, not run yet

    ordered_tasks_runner.run()

    assert APPLIED == [(1, 1), (2, 1), (1, 2)]
# [/order]


def test_interleaved_keys_each_run_in_publish_order(ordered_tasks_runner: OrderedTasksRunner) -> None:
    published: list[tuple[Any, int]] = []
    pattern = [3, 1, 1, 2, 3, 3, 2, 1, 2, 3, 1, 2]  # the order in which keys publish their next event
    seqs = dict.fromkeys((1, 2, 3), 0)
    for account in pattern:
        seqs[account] += 1
        published.append((account, seqs[account]))
        if account == 3:  # by name, as another service does; ROUTES orders it by its ``key`` argument
            celery_app.send_task(routed_event.name, kwargs={"key": account, "seq": seqs[account]})
        else:
            apply_event.apply_async(kwargs={"account_id": account, "seq": seqs[account]})
    pending = ordered_tasks_runner.pending
    assert [(m.key, m.kwargs.get("seq")) for m in pending] == [(str(a), s) for a, s in published]
    assert {m.partition for m in pending if m.key == "3"} == {partition_for(3)}

    executions = ordered_tasks_runner.run()

    assert APPLIED == published
    for account in (1, 2, 3):
        assert [seq for a, seq in APPLIED if a == account] == [1, 2, 3, 4]
    assert [e.outcome for e in executions] == ["succeeded"] * len(published)
    assert [(e.key, e.kwargs["seq"]) for e in executions] == [(str(a), s) for a, s in published]
    assert ordered_tasks_runner.pending == []
    assert not AccountState.objects.exists()  # the happy path writes nothing, as in a worker


def test_messages_published_by_tasks_run_in_the_same_run(ordered_tasks_runner: OrderedTasksRunner) -> None:
    open_account.delay(account_id=5, seq=1)
    apply_event.delay(account_id=6, seq=1)
    executions = ordered_tasks_runner.run()
    assert APPLIED == [(5, 1), (6, 1), (5, 2)]
    assert [e.task_name for e in executions] == [open_account.name, apply_event.name, apply_event.name]
    assert ordered_tasks_runner.pending == []


def test_a_chain_of_ordered_tasks_runs_step_by_step(ordered_tasks_runner: OrderedTasksRunner) -> None:
    chain(apply_event.si(account_id=7, seq=1), apply_event.si(account_id=7, seq=2),
          apply_event.si(account_id=8, seq=1)).delay()
    assert [m.kwargs for m in ordered_tasks_runner.pending] == [{"account_id": 7, "seq": 1}]
    ordered_tasks_runner.run()
    assert APPLIED == [(7, 1), (7, 2), (8, 1)]


# [delay_on_commit]
def test_docs_delay_on_commit_publishes_when_the_transaction_commits(
        ordered_tasks_runner, django_capture_on_commit_callbacks):
    apply_event.delay_on_commit(account_id=1, seq=1)
    assert ordered_tasks_runner.pending == []  # the test's transaction never commits

    with django_capture_on_commit_callbacks(execute=True):
        apply_event.delay_on_commit(account_id=1, seq=2)
    ordered_tasks_runner.run()

    assert APPLIED == [(1, 2)]
# [/delay_on_commit]


def test_arguments_go_through_the_serializer(ordered_tasks_runner: OrderedTasksRunner) -> None:
    with pytest.raises(EncodeError):  # as with a broker: the argument cannot be sent
        apply_event.delay(account_id=1, seq=object())
    assert ordered_tasks_runner.pending == []
    apply_event.delay(account_id=1, seq=2)
    [message] = ordered_tasks_runner.pending
    assert message.content_type == "application/json"
    assert json.loads(message.body)[:2] == [[], {"account_id": 1, "seq": 2}]
    assert (message.headers["ordered_key"], message.headers["task"]) == ("1", apply_event.name)


def test_publish_time_checks_still_apply(ordered_tasks_runner: OrderedTasksRunner) -> None:
    with pytest.raises(OrderedTaskError):
        apply_event.apply_async(kwargs={"account_id": 1, "seq": 1}, countdown=5)
    with pytest.raises(OrderedTaskError):
        apply_event.delay(account_id=None, seq=1)
    assert ordered_tasks_runner.pending == []


# Failures, replay and skip ---------------------------------------------------------------------


# [failure]
def test_docs_a_failure_blocks_its_account_only(ordered_tasks_runner):
    BROKEN.add((1, 2))  # event 2 of account 1 raises ValueError
    for seq in (1, 2, 3):
        apply_event.delay(account_id=1, seq=seq)
        apply_event.delay(account_id=2, seq=seq)

    ordered_tasks_runner.run()

    assert APPLIED == [(1, 1), (2, 1), (2, 2), (2, 3)]  # account 2 went on
    assert AccountState.objects.get(key="1").status == "blocked"
    assert [(m.reason, m.state) for m in ParkedMessage.objects.filter(key="1")] == [
        ("failed", "parked"),    # event 2, with its exception and traceback
        ("key_held", "parked"),  # event 3 waits behind it, not run
    ]
# [/failure]


def test_parked_rows_are_the_ones_a_worker_writes(ordered_tasks_runner: OrderedTasksRunner) -> None:
    BROKEN.add((1, 2))
    blocked: list[dict[str, Any]] = []
    key_blocked.connect(lambda **kw: blocked.append(kw), weak=False, dispatch_uid="helper-blocked")
    try:
        first = apply_event.delay(account_id=1, seq=1)
        failing = apply_event.delay(account_id=1, seq=2)
        later = apply_event.delay(account_id=1, seq=3)
        executions = ordered_tasks_runner.run()
    finally:
        key_blocked.disconnect(dispatch_uid="helper-blocked")
    assert [e.outcome for e in executions] == ["succeeded", "failed", "parked"]
    assert [e.task_id for e in executions] == [first.id, failing.id, later.id]
    assert isinstance(executions[1].exception, ValueError)
    state = AccountState.objects.get(key="1")
    assert (state.status, state.partition, state.failures, state.blocks, state.epoch) == (
        "blocked", partition_for(1), 1, 1, 1)
    assert "ValueError: event 2 of account 1 is broken" in state.last_error
    rows = list(ParkedMessage.objects.filter(key="1").order_by("position"))
    assert [(r.task_id, r.task_name, r.attempts) for r in rows] == [
        (failing.id, apply_event.name, 1), (later.id, apply_event.name, 0)]
    assert "Traceback" in rows[0].traceback and rows[1].traceback == ""
    assert rows[0].headers["ordered_key"] == "1" and rows[0].partition == partition_for(1)
    assert [r.arguments() for r in rows] == [([], {"account_id": 1, "seq": 2}), ([], {"account_id": 1, "seq": 3})]
    assert [(b["key"], b["task_id"], b["reason"]) for b in blocked] == [("1", failing.id, "failed")]


def test_messages_published_while_blocked_are_parked(ordered_tasks_runner: OrderedTasksRunner) -> None:
    BROKEN.add((1, 1))
    apply_event.delay(account_id=1, seq=1)
    ordered_tasks_runner.run()
    apply_event.delay(account_id=1, seq=2)
    apply_event.delay(account_id=2, seq=1)
    assert [e.outcome for e in ordered_tasks_runner.run()] == ["parked", "succeeded"]
    assert APPLIED == [(2, 1)]
    assert [kw["seq"] for _, _, kw in parked(1)] == [1, 2]


def test_key_states_the_test_sets_between_runs_are_honoured(
        ordered_tasks_runner: OrderedTasksRunner) -> None:
    apply_event.delay(account_id=1, seq=1)
    ordered_tasks_runner.run()
    AccountState.objects.create(key="1", partition=partition_for(1), status="blocked", epoch=1)
    apply_event.delay(account_id=1, seq=2)
    assert [e.outcome for e in ordered_tasks_runner.run()] == ["parked"]
    assert APPLIED == [(1, 1)]


def test_the_admin_shows_what_the_runner_parked(ordered_tasks_runner: OrderedTasksRunner,
                                                admin_client: Any) -> None:
    BROKEN.add((1, 2))
    for seq in (1, 2, 3):
        apply_event.delay(account_id=1, seq=seq)
    ordered_tasks_runner.run()
    state = AccountState.objects.get(key="1")
    page = admin_client.get(reverse("admin:ordered_tasks_accountstate_change", args=(state.pk,)))
    assert page.status_code == 200
    assert "event 2 of account 1 is broken" in page.content.decode()
    assert apply_event.name in page.content.decode()


# [replay]
def test_docs_replay_runs_the_parked_events_in_order(ordered_tasks_runner):
    BROKEN.add((1, 2))
    for seq in (1, 2, 3):
        apply_event.delay(account_id=1, seq=seq)
    ordered_tasks_runner.run()
    assert APPLIED == [(1, 1)]

    BROKEN.clear()  # the bug is fixed
    ordered_tasks_runner.replay(1, requested_by="alice")
    ordered_tasks_runner.run()

    assert APPLIED == [(1, 1), (1, 2), (1, 3)]
    assert AccountState.objects.get(key="1").status == "active"
    assert not ParkedMessage.objects.filter(key="1").exists()
# [/replay]


# [skip]
def test_docs_skip_sets_the_failed_event_aside(ordered_tasks_runner):
    BROKEN.add((1, 2))
    for seq in (1, 2, 3):
        apply_event.delay(account_id=1, seq=seq)
    ordered_tasks_runner.run()

    ordered_tasks_runner.skip(1)
    ordered_tasks_runner.run()

    assert APPLIED == [(1, 1), (1, 3)]
    assert [(m.state, m.arguments()[1]["seq"]) for m in ParkedMessage.objects.filter(key="1")] == [
        ("skipped", 2)]  # kept as a record
# [/skip]


def test_replay_records_the_request_and_resumes_the_key(ordered_tasks_runner: OrderedTasksRunner) -> None:
    BROKEN.add((1, 2))
    for seq in (1, 2, 3):
        apply_event.delay(account_id=1, seq=seq)
    ordered_tasks_runner.run()
    BROKEN.clear()
    request = ordered_tasks_runner.replay(1, requested_by="alice")
    assert (request.action, request.requested_by, request.applied_at) == ("replay", "alice", None)
    assert [m.is_control for m in ordered_tasks_runner.pending] == [True]
    apply_event.delay(account_id=1, seq=4)  # published after the request: runs after the backlog
    resumed: list[str] = []
    key_resumed.connect(lambda key, **_: resumed.append(key), weak=False, dispatch_uid="helper-resumed")
    try:
        executions = ordered_tasks_runner.run()
    finally:
        key_resumed.disconnect(dispatch_uid="helper-resumed")
    assert APPLIED == [(1, 1), (1, 2), (1, 3), (1, 4)]
    assert [(e.kwargs["seq"], e.outcome) for e in executions] == [(2, "succeeded"), (3, "succeeded"),
                                                                  (4, "succeeded")]
    assert resumed == ["1"]
    request.refresh_from_db()
    assert request.applied_at is not None and "active" in request.outcome
    state = AccountState.objects.get(key="1")
    assert (state.status, state.replays, state.skips, state.epoch) == ("active", 1, 0, 2)


def test_a_replay_that_fails_again_blocks_again_with_the_rest_parked(
        ordered_tasks_runner: OrderedTasksRunner) -> None:
    BROKEN.update({(1, 2), (1, 3)})
    for seq in (1, 2, 3, 4):
        apply_event.delay(account_id=1, seq=seq)
    ordered_tasks_runner.run()
    BROKEN.discard((1, 2))
    ordered_tasks_runner.replay(1)
    ordered_tasks_runner.run()
    assert APPLIED == [(1, 1), (1, 2)]
    assert [(reason, kw["seq"]) for reason, _, kw in parked(1)] == [("failed", 3), ("key_held", 4)]
    state = AccountState.objects.get(key="1")
    assert (state.status, state.failures, state.blocks, state.replays) == ("blocked", 2, 2, 1)


def test_the_real_actions_and_commands_work_once_their_transaction_commits(
        ordered_tasks_runner: OrderedTasksRunner, django_capture_on_commit_callbacks: Any) -> None:
    BROKEN.update({(1, 1), (2, 1)})
    for account in (1, 2):
        for seq in (1, 2):
            apply_event.delay(account_id=account, seq=seq)
    ordered_tasks_runner.run()
    BROKEN.clear()
    with django_capture_on_commit_callbacks(execute=True):
        ordered_tasks.replay(1, requested_by="bob")
    with django_capture_on_commit_callbacks(execute=True):
        call_command("ordered_skip", "2", "--by", "carol", stdout=io.StringIO())
    assert [m.is_control for m in ordered_tasks_runner.pending] == [True, True]
    ordered_tasks_runner.run()
    assert APPLIED == [(1, 1), (1, 2), (2, 2)]
    assert set(ControlRequest.objects.values_list("key", "action", "requested_by")) == {
        ("1", "replay", "bob"), ("2", "skip", "carol")}
    assert not ControlRequest.objects.filter(applied_at=None).exists()


# [on_commit]
def test_docs_code_that_replays_on_commit(ordered_tasks_runner, django_capture_on_commit_callbacks):
    BROKEN.add((1, 2))
    for seq in (1, 2, 3):
        apply_event.delay(account_id=1, seq=seq)
    ordered_tasks_runner.run()
    BROKEN.clear()

    with django_capture_on_commit_callbacks(execute=True):
        call_command("ordered_replay", "1")  # or your view, admin action ... that replays
    ordered_tasks_runner.run()

    assert APPLIED == [(1, 1), (1, 2), (1, 3)]
# [/on_commit]


def test_replay_of_an_active_key_is_refused_as_in_production(ordered_tasks_runner: OrderedTasksRunner) -> None:
    with pytest.raises(UnknownKeyError):
        ordered_tasks_runner.replay(1)
    apply_event.delay(account_id=1, seq=1)
    ordered_tasks_runner.run()
    with pytest.raises(UnknownKeyError):
        ordered_tasks_runner.skip(1)


def test_continue_policy_records_the_failure_and_goes_on(ordered_tasks_runner: OrderedTasksRunner) -> None:
    BROKEN.add((1, 1))
    notify.delay(account_id=1, seq=1)
    notify.delay(account_id=1, seq=2)
    ordered_tasks_runner.run()
    assert APPLIED == [(1, 2)]
    assert [(reason, state, kw["seq"]) for reason, state, kw in parked(1)] == [("failed", "failed", 1)]
    state = AccountState.objects.get(key="1")
    assert (state.status, state.failures, state.blocks) == ("active", 1, 0)


def test_a_message_no_worker_could_run_is_parked_as_a_worker_parks_it(
        ordered_tasks_runner: OrderedTasksRunner) -> None:
    celery_app.send_task("events.testing_helper.not_deployed_yet", kwargs={"key": "k9", "seq": 1})
    celery_app.send_task(routed_event.name, kwargs={"key": "k9", "seq": 2})
    ordered_tasks_runner.run()
    assert APPLIED == []
    assert [reason for reason, _, _ in parked("k9")] == ["unknown_task", "key_held"]
    assert AccountState.objects.get(key="k9").status == "blocked"


def test_a_routed_plain_task_gets_the_failure_handling_too(ordered_tasks_runner: OrderedTasksRunner) -> None:
    BROKEN.add(("r1", 1))
    routed_event.delay(key="r1", seq=1)
    routed_event.delay(key="r1", seq=2)
    ordered_tasks_runner.run()
    assert APPLIED == []
    assert [reason for reason, _, _ in parked("r1")] == ["failed", "key_held"]
    BROKEN.clear()
    ordered_tasks_runner.replay("r1")
    ordered_tasks_runner.run()
    assert APPLIED == [("r1", 1), ("r1", 2)]


# In-place retries ------------------------------------------------------------------------------


# [retry]
def test_docs_a_retry_runs_before_the_later_events_of_its_account(ordered_tasks_runner):
    OUTAGES[1] = 2  # the CRM fails twice for account 1
    push_to_crm.delay(account_id=1, seq=1)
    apply_event.delay(account_id=1, seq=2)
    apply_event.delay(account_id=2, seq=1)

    executions = ordered_tasks_runner.run()  # does not wait out the retry delays

    assert APPLIED == [(2, 1), (1, 1), (1, 2)]
    assert [e.retry_in for e in executions if e.outcome == "retrying"] == [1, 2]
# [/retry]


def test_autoretry_holds_the_key_in_place(ordered_tasks_runner: OrderedTasksRunner) -> None:
    OUTAGES[1] = 2
    push_to_crm.delay(account_id=1, seq=1)
    apply_event.delay(account_id=1, seq=2)
    apply_event.delay(account_id=2, seq=1)
    started = time.monotonic()
    executions = ordered_tasks_runner.run()
    assert time.monotonic() - started < 1  # the 1 s and 2 s delays were skipped
    assert [(e.task_name.rsplit(".", 1)[1], e.key, e.outcome) for e in executions] == [
        ("push_to_crm", "1", "retrying"),
        ("apply_event", "1", "parked"),   # its key waits for the retry
        ("apply_event", "2", "succeeded"),  # other keys go on during the delay
        ("push_to_crm", "1", "retrying"),
        ("push_to_crm", "1", "succeeded"),
        ("apply_event", "1", "succeeded"),
    ]
    assert isinstance(executions[0].exception, ConnectionError)
    assert APPLIED == [(2, 1), (1, 1), (1, 2)]
    state = AccountState.objects.get(key="1")
    assert (state.status, state.retries, state.failures, state.blocks) == ("active", 2, 2, 0)
    assert not ParkedMessage.objects.exists()


def test_self_retry_runs_in_place_with_the_retry_count(ordered_tasks_runner: OrderedTasksRunner) -> None:
    OUTAGES[3] = 2
    charge.delay(account_id=3, seq=1)
    apply_event.delay(account_id=3, seq=2)
    executions = ordered_tasks_runner.run()
    assert APPLIED == [(3, 1), (3, 2)]
    assert RETRIES_SEEN == [0, 1, 2]
    assert [e.retry_in for e in executions if e.outcome == "retrying"] == [30, 30]
    assert AccountState.objects.get(key="3").status == "active"


def test_a_retrying_key_is_visible_between_runs(ordered_tasks_runner: OrderedTasksRunner) -> None:
    OUTAGES[1] = 1
    push_to_crm.delay(account_id=1, seq=1)
    apply_event.delay(account_id=1, seq=2)
    executions = ordered_tasks_runner.run(fast_forward=False)  # the wake-up of the retry waits
    assert [e.outcome for e in executions] == ["retrying", "parked"]
    assert APPLIED == []
    state = AccountState.objects.get(key="1")
    assert state.status == "retrying" and state.retry_at is not None
    assert [(reason, kw["seq"]) for reason, _, kw in parked(1)] == [("retrying", 1), ("key_held", 2)]
    assert [m.is_control and m.eta is not None for m in ordered_tasks_runner.pending] == [True]


def test_retries_exhausted_block_the_key(ordered_tasks_runner: OrderedTasksRunner) -> None:
    OUTAGES[1] = -1
    push_to_crm.delay(account_id=1, seq=1)
    apply_event.delay(account_id=1, seq=2)
    executions = ordered_tasks_runner.run()
    assert [e.outcome for e in executions if e.kwargs["seq"] == 1] == ["retrying"] * 3 + ["failed"]
    assert APPLIED == []
    rows = list(ParkedMessage.objects.filter(key="1").order_by("position"))
    assert [(r.reason, r.attempts) for r in rows] == [("failed", 4), ("key_held", 0)]
    assert AccountState.objects.get(key="1").status == "blocked"


def test_replay_of_a_retrying_key_retries_now(ordered_tasks_runner: OrderedTasksRunner) -> None:
    OUTAGES[1] = 1
    charge.delay(account_id=1, seq=1)
    ordered_tasks_runner.run(fast_forward=False)
    assert AccountState.objects.get(key="1").status == "retrying"
    ordered_tasks_runner.replay(1)
    ordered_tasks_runner.run()
    assert APPLIED == [(1, 1)]
    assert RETRIES_SEEN == [0, 0]  # a replay gives the message its retries again
    assert AccountState.objects.get(key="1").status == "active"


# The runner itself -----------------------------------------------------------------------------


# [context_manager]
@pytest.mark.django_db
def test_docs_the_runner_as_a_context_manager():
    from ordered_tasks.testing import OrderedTasksRunner

    with OrderedTasksRunner() as runner:
        apply_event.delay(account_id=1, seq=1)
        apply_event.delay(account_id=1, seq=2)
        assert [m.kwargs["seq"] for m in runner.pending] == [1, 2]
        runner.run()
    assert APPLIED == [(1, 1), (1, 2)]
# [/context_manager]


@pytest.mark.django_db
def test_stopping_puts_everything_back() -> None:
    from ordered_tasks.testing import OrderedTasksRunner

    guard = celery_app.amqp.send_task_message
    routed = type(celery_app.tasks[routed_event.name])
    assert not issubclass(routed, GuardedTaskMixin)  # a plain task, until a worker (or runner) guards it
    runner = OrderedTasksRunner()
    with pytest.raises(RunnerError, match="not active"):
        runner.run()
    with runner:
        assert celery_app.amqp.send_task_message is not guard
        assert isinstance(celery_app.tasks[routed_event.name], GuardedTaskMixin)
        apply_event.delay(account_id=1, seq=1)
        with pytest.raises(RunnerError, match="Another OrderedTasksRunner"), OrderedTasksRunner():
            pass
    assert celery_app.amqp.send_task_message is guard
    assert type(celery_app.tasks[routed_event.name]) is routed
    assert runner.pending == [] and APPLIED == []
    with OrderedTasksRunner() as again:  # a stopped runner leaves nothing behind that refuses a new one
        assert again.pending == []


def test_a_failed_start_puts_back_what_it_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    from ordered_tasks.testing import OrderedTasksRunner

    guard = celery_app.amqp.send_task_message

    def broken(self: Any, app: Any) -> None:
        raise RuntimeError("failed on purpose")

    monkeypatch.setattr(OrderedTasksRunner, "_disable_ledger", broken)
    with pytest.raises(RuntimeError, match="on purpose"):
        OrderedTasksRunner().start()
    assert celery_app.amqp.send_task_message is guard
    assert not isinstance(celery_app.tasks[routed_event.name], GuardedTaskMixin)
    monkeypatch.undo()
    with OrderedTasksRunner() as runner:  # nothing is left active
        assert runner.pending == []


def test_run_gives_up_after_its_limit(ordered_tasks_runner: OrderedTasksRunner) -> None:
    for seq in range(1, 6):
        apply_event.delay(account_id=1, seq=seq)
    with pytest.raises(RunnerError, match="2 are still waiting"):
        ordered_tasks_runner.run(limit=3)
    assert APPLIED == [(1, 1), (1, 2), (1, 3)]
    ordered_tasks_runner.run()
    assert APPLIED == [(1, seq) for seq in range(1, 6)]


def test_no_broker_and_no_redis_are_needed(ordered_tasks_runner: OrderedTasksRunner,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(self: socket.socket, *args: Any) -> None:
        raise AssertionError(f"the runner used the network: {args!r:.80}")

    for method in ("connect", "connect_ex", "send", "sendall"):  # also on connections opened earlier
        monkeypatch.setattr(socket.socket, method, no_network)
    OUTAGES[1] = 1
    BROKEN.add((2, 1))
    push_to_crm.delay(account_id=1, seq=1)
    apply_event.delay(account_id=2, seq=1)
    chain(apply_event.si(account_id=3, seq=1), apply_event.si(account_id=3, seq=2)).delay()
    celery_app.send_task(routed_event.name, kwargs={"key": 4, "seq": 1})
    ordered_tasks_runner.run()
    BROKEN.clear()
    ordered_tasks_runner.replay(2)
    ordered_tasks_runner.run()
    assert sorted(APPLIED) == [(1, 1), (2, 1), (3, 1), (3, 2), (4, 1)]


# Eager mode ------------------------------------------------------------------------------------


# [eager_today]
@pytest.mark.django_db
def test_docs_eager_mode_runs_past_a_failure(eager):
    BROKEN.add((1, 2))
    results = [apply_event.delay(account_id=1, seq=seq) for seq in (1, 2, 3)]

    assert [r.state for r in results] == ["SUCCESS", "FAILURE", "SUCCESS"]
    assert APPLIED == [(1, 1), (1, 3)]  # event 3 ran although event 2 failed
    assert not AccountState.objects.exists() and not ParkedMessage.objects.exists()
    with pytest.raises(UnknownKeyError):  # nothing was parked, so there is nothing to replay
        ordered_tasks.replay(1)
# [/eager_today]


@pytest.mark.django_db
def test_eager_mode_retries_at_once_and_not_in_place(eager: Any) -> None:
    OUTAGES[1] = 2
    result = charge.delay(account_id=1, seq=1)
    assert result.state == "SUCCESS"
    assert RETRIES_SEEN == [0, 1, 2]  # Celery's eager retries: run again at once, no delay, no state
    assert not AccountState.objects.exists()


def test_the_runner_in_an_eager_app_captures_ordered_tasks_only(
        eager: Any, ordered_tasks_runner: OrderedTasksRunner) -> None:
    note.delay("plain tasks stay eager")
    assert NOTES == ["plain tasks stay eager"]
    BROKEN.add((1, 2))
    for seq in (1, 2, 3):
        apply_event.delay(account_id=1, seq=seq)
    routed_event.delay(key="r", seq=1)
    assert APPLIED == [] and len(ordered_tasks_runner.pending) == 4
    ordered_tasks_runner.run()
    assert APPLIED == [(1, 1), ("r", 1)]
    assert [reason for reason, _, _ in parked(1)] == ["failed", "key_held"]
    BROKEN.clear()
    ordered_tasks_runner.replay(1)  # its control message is captured too, not run eagerly
    assert [m.is_control for m in ordered_tasks_runner.pending] == [True]
    ordered_tasks_runner.run()
    assert APPLIED == [(1, 1), ("r", 1), (1, 2), (1, 3)]


def test_in_an_eager_app_tasks_run_by_the_runner_publish_as_the_settings_say(
        eager: Any, ordered_tasks_runner: OrderedTasksRunner) -> None:
    OUTAGES[2] = 1
    open_account.delay(account_id=1, seq=1, with_note=True)
    push_to_crm.delay(account_id=2, seq=1)
    ordered_tasks_runner.run()
    assert NOTES == ["opened 1"]  # the plain task it published ran eagerly
    assert APPLIED == [(1, 1), (1, 2), (2, 1)]  # the ordered one was captured and ran after
    assert AccountState.objects.get(key="2").retries == 1  # retried in place, not eagerly


@pytest.mark.django_db
def test_eager_mode_is_restored_when_the_runner_stops(eager: Any) -> None:
    from ordered_tasks.testing import OrderedTasksRunner

    with OrderedTasksRunner():
        assert "apply_async" in vars(GuardedTaskMixin)
        assert eager.conf.task_always_eager  # still true for plain tasks
    assert eager.conf.task_always_eager is True and "task_always_eager" not in eager.conf.changes
    assert "apply_async" not in vars(GuardedTaskMixin)
    apply_event.delay(account_id=1, seq=1)
    assert APPLIED == [(1, 1)]  # eager again


def test_in_an_eager_app_celery_runs_a_chain_itself(eager: Any, ordered_tasks_runner: OrderedTasksRunner) -> None:
    """A limit: Celery applies an eager canvas as a whole, before any of its tasks is published."""
    chain(apply_event.si(account_id=1, seq=1), apply_event.si(account_id=1, seq=2)).delay()
    assert APPLIED == [(1, 1), (1, 2)] and ordered_tasks_runner.pending == []  # run at once, not captured
    BROKEN.add((2, 1))
    with pytest.raises(ValueError):  # the failure reaches the publisher; nothing is parked
        chain(apply_event.si(account_id=2, seq=1), apply_event.si(account_id=2, seq=2)).delay()
    assert ordered_tasks_runner.pending == [] and not ParkedMessage.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_with_real_commits_on_commit_publishes_at_once(ordered_tasks_runner: OrderedTasksRunner) -> None:
    apply_event.delay_on_commit(account_id=1, seq=1)
    BROKEN.add((1, 1))
    ordered_tasks_runner.run()
    BROKEN.clear()
    ordered_tasks.replay(1)  # its on-commit callback runs at once: nothing needs capturing
    assert [m.is_control for m in ordered_tasks_runner.pending] == [True]
    ordered_tasks_runner.run()
    assert APPLIED == [(1, 1)]
    assert AccountState.objects.get(key="1").status == "active"


# [test_case]
class AccountEventsTest(TestCase):
    def setUp(self):
        from ordered_tasks.testing import OrderedTasksRunner

        self.runner = OrderedTasksRunner().start()
        self.addCleanup(self.runner.stop)

    def test_a_failure_blocks_and_a_replay_resumes(self):
        BROKEN.add((1, 1))
        apply_event.delay(account_id=1, seq=1)
        apply_event.delay(account_id=1, seq=2)
        self.runner.run()
        self.assertEqual(AccountState.objects.get(key="1").status, "blocked")
        BROKEN.clear()
        self.runner.replay(1)
        self.runner.run()
        self.assertEqual(APPLIED, [(1, 1), (1, 2)])
# [/test_case]


def test_the_runner_imports_without_pytest_and_before_django_is_set_up() -> None:
    """The plugin loads before pytest-django sets Django up; the context manager needs no pytest."""
    script = (
        "import sys\n"
        "sys.modules['pytest'] = None\n"  # as if pytest were not installed
        "import ordered_tasks.testing as testing\n"
        "assert 'ordered_tasks.models' not in sys.modules\n"
        "assert not hasattr(testing, 'ordered_tasks_runner')\n"
        "print(testing.OrderedTasksRunner.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["OrderedTasksRunner"]
