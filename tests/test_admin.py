"""The admin dashboard through Django's test client: pages, permissions, actions, escaping, brokers."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from django.apps import apps
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from ordered_tasks import partition_for
from ordered_tasks.models import AccountState, ControlRequest, ParkedMessage, PartitionStatus
from ordered_tasks.worker.health.figures import Figures, write

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:ordered_tasks_accountstate_changelist"
PARTITIONS = "admin:ordered_tasks_partitions"
EVIL = "<img src=x onerror=alert(1)>"


def _state(key: str, status: str, error: str = "", parked: int = 0) -> AccountState:
    state = AccountState.objects.create(key=key, partition=partition_for(key), status=status, last_error=error,
                                        sequence=parked)
    for position in range(1, parked + 1):
        body = json.dumps([[], {"account": key, "step": position, "note": EVIL}, {}]).encode()
        ParkedMessage.objects.create(
            key=key, partition=state.partition, position=position, task_name="accounts.apply_event",
            task_id=str(uuid.uuid4()), body=body, content_type="application/json", content_encoding="utf-8",
            reason="failed" if position == 1 else "key_held", exception=error if position == 1 else "",
            traceback="Traceback (most recent call last):\n  ...\nValueError: boom" if position == 1 else "",
            attempts=1 if position == 1 else 0)
    return state


@pytest.fixture
def data() -> dict[str, AccountState]:
    states = {
        "blocked": _state("acct-blocked", "blocked", "ValueError: balance would go negative", parked=3),
        "retrying": _state("acct-retrying", "retrying", "ConnectionError: bank down", parked=1),
        "active": _state("acct-active", "active"),
        "evil": _state(EVIL, "blocked", f"KeyError: {EVIL}", parked=1),
    }
    ControlRequest.objects.create(key="acct-blocked", action="replay", requested_by="alice", epoch=0,
                                  applied_at=timezone.now(), outcome="applied; key is blocked")
    return states


def _user(name: str, *, staff: bool = True, superuser: bool = False, perms: tuple[str, ...] = ()) -> User:
    user = User.objects.create_user(name, password="pw", is_staff=staff, is_superuser=superuser)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="ordered_tasks",
                                                        codename__in=perms))
    return user


@pytest.fixture
def users() -> dict[str, User]:
    return {
        "non_staff": _user("pat", staff=False, perms=("view_accountstate", "replay_accountstate")),
        "staff": _user("sam"),
        "viewer": _user("vic", perms=("view_accountstate",)),
        "operator": _user("olga", perms=("view_accountstate", "replay_accountstate")),
        "superuser": _user("root", superuser=True),
    }


def _client(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def _select(action: str, *states: AccountState, post: bool = False) -> dict[str, Any]:
    form: dict[str, Any] = {"action": action, "_selected_action": [s.pk for s in states]}
    if post:
        form["post"] = "yes"
    return form


def test_the_changelist_shows_stuck_accounts_first_with_their_figures(data: dict[str, AccountState],
                                                                      users: dict[str, User]) -> None:
    response = _client(users["viewer"]).get(reverse(CHANGELIST))
    assert response.status_code == 200
    shown = [state.key for state in response.context["cl"].result_list]
    assert shown.index("acct-blocked") < shown.index("acct-retrying") < shown.index("acct-active")
    page = response.content.decode()
    for text in ("acct-blocked", "ValueError: balance would go negative", "blocked", "retrying"):
        assert text in page
    row = next(s for s in response.context["cl"].result_list if s.key == "acct-blocked")
    assert row.parked_count == 3
    # Every write of a state counts as activity, so no account shows an empty "last activity".
    assert all(state.last_activity is not None for state in response.context["cl"].result_list)


def test_filters_and_search(data: dict[str, AccountState], users: dict[str, User]) -> None:
    client = _client(users["viewer"])
    blocked = client.get(reverse(CHANGELIST), {"status__exact": "retrying"}).context["cl"].result_list
    assert [s.key for s in blocked] == ["acct-retrying"]
    partition = data["active"].partition
    by_partition = client.get(reverse(CHANGELIST), {"partition__exact": partition}).context["cl"].result_list
    assert "acct-active" in [s.key for s in by_partition]
    assert all(s.partition == partition for s in by_partition)
    found = client.get(reverse(CHANGELIST), {"q": "retry"}).context["cl"].result_list
    assert [s.key for s in found] == ["acct-retrying"]


def test_the_account_page_shows_parked_messages_in_order_and_the_history(data: dict[str, AccountState],
                                                                         users: dict[str, User]) -> None:
    state = data["blocked"]
    response = _client(users["viewer"]).get(reverse("admin:ordered_tasks_accountstate_change", args=[state.pk]))
    assert response.status_code == 200
    page = response.content.decode()
    steps = [page.index(f"&quot;step&quot;: {n}") for n in (1, 2, 3)]
    assert steps == sorted(steps)
    assert "accounts.apply_event" in page and "ValueError: boom" in page
    assert "alice" in page and "applied; key is blocked" in page
    assert "Save" not in page  # read-only
    if not apps.is_installed("django_celery_results"):
        pytest.skip("django-celery-results is not installed: no links to its results to check")
    # django-celery-results is installed: links to the key's results and each parked task's result.
    results = reverse("admin:django_celery_results_taskresult_changelist")
    assert f'{results}?q=acct-blocked' in page
    assert f"{results}?task_id={ParkedMessage.objects.filter(key=state.key).first().task_id}" in page  # type: ignore[union-attr]
    assert "Save" not in page  # read-only


def test_no_adding_editing_or_deleting_states_by_hand(data: dict[str, AccountState],
                                                      users: dict[str, User]) -> None:
    client = _client(users["superuser"])
    assert client.get(reverse("admin:ordered_tasks_accountstate_add")).status_code == 403
    state = data["blocked"]
    url = reverse("admin:ordered_tasks_accountstate_change", args=[state.pk])
    client.post(url, {"key": "changed", "status": "active"})
    assert AccountState.objects.get(pk=state.pk).status == "blocked"
    assert client.get(reverse("admin:ordered_tasks_accountstate_delete", args=[state.pk])).status_code == 403
    actions = [name for name, _ in client.get(reverse(CHANGELIST)).context["action_form"].fields["action"].choices]
    assert "delete_selected" not in actions


@pytest.mark.parametrize(("who", "changelist", "actions"), [
    ("anonymous", 302, None), ("non_staff", 302, None), ("staff", 403, None),
    ("viewer", 200, []), ("operator", 200, ["replay", "skip"]), ("superuser", 200, ["replay", "skip"]),
])
def test_permission_matrix(data: dict[str, AccountState], users: dict[str, User], who: str, changelist: int,
                           actions: list[str] | None) -> None:
    client = _client(users.get(who))
    pages = [reverse(CHANGELIST), reverse("admin:ordered_tasks_accountstate_change", args=[data["blocked"].pk]),
             reverse(PARTITIONS)]
    for url in pages:
        response = client.get(url)
        assert response.status_code == changelist, url
        if changelist == 302:
            assert response["Location"].startswith(reverse("admin:login"))
    if actions is not None:
        response = client.get(reverse(CHANGELIST))
        offered = [name for name, _ in response.context["action_form"].fields["action"].choices if name] \
            if response.context.get("action_form") else []
        assert offered == actions


def test_replay_asks_for_confirmation_then_acts_and_logs(data: dict[str, AccountState],
                                                         users: dict[str, User]) -> None:
    client = _client(users["operator"])
    states = (data["blocked"], data["evil"])
    confirm = client.post(reverse(CHANGELIST), _select("replay", *states))
    assert confirm.status_code == 200
    assert b'name="post" value="yes"' in confirm.content and ControlRequest.objects.count() == 1
    done = client.post(reverse(CHANGELIST), _select("replay", *states, post=True))
    assert done.status_code == 302
    requests = ControlRequest.objects.filter(action="replay", requested_by="olga")
    assert sorted(r.key for r in requests) == sorted(s.key for s in states)
    logged = LogEntry.objects.filter(user=users["operator"], action_flag=CHANGE)
    assert sorted(entry.object_repr for entry in logged) == sorted(str(s) for s in states)


def test_skip_of_an_active_account_is_refused_with_the_reason(data: dict[str, AccountState],
                                                              users: dict[str, User]) -> None:
    client = _client(users["superuser"])
    response = client.post(reverse(CHANGELIST), _select("skip", data["active"], data["retrying"], post=True),
                           follow=True)
    assert ControlRequest.objects.filter(action="skip").values_list("key", flat=True).get() == "acct-retrying"
    texts = [str(m) for m in response.context["messages"]]
    assert any("acct-active" in text and "Nothing was done" in text for text in texts), texts


def test_a_forged_post_by_a_view_only_user_does_nothing(data: dict[str, AccountState],
                                                        users: dict[str, User]) -> None:
    client = _client(users["viewer"])
    before = ControlRequest.objects.count()
    for action in ("replay", "skip"):
        client.post(reverse(CHANGELIST), _select(action, data["blocked"], post=True))
    assert ControlRequest.objects.count() == before
    assert not LogEntry.objects.exists()


def test_user_text_is_escaped_everywhere(data: dict[str, AccountState], users: dict[str, User]) -> None:
    client = _client(users["operator"])
    state = data["evil"]
    pages = [
        client.get(reverse(CHANGELIST)),
        client.get(reverse("admin:ordered_tasks_accountstate_change", args=[state.pk])),
        client.post(reverse(CHANGELIST), _select("replay", state)),
    ]
    for response in pages:
        page = response.content.decode()
        assert EVIL not in page
        assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_the_partitions_page_shows_real_figures(app: Celery, broker: str, data: dict[str, AccountState],
                                                users: dict[str, User], monkeypatch: pytest.MonkeyPatch) -> None:
    from ordered_tasks import dashboard
    from tests.testapp.tasks import ordered_record

    monkeypatch.setattr(dashboard, "broker_url", lambda: broker)
    key = "acct-queued"
    with app.producer_or_acquire() as producer:
        for seq in range(3):
            app.tasks[ordered_record.name].apply_async(kwargs={"run": "r", "key": key, "seq": seq},
                                                       producer=producer)
    figures = Figures()
    figures.worker = "w1@host"
    write(figures, {partition_for(key)})
    response = _client(users["viewer"]).get(reverse(PARTITIONS))
    assert response.status_code == 200
    assert b'http-equiv="refresh"' in response.content
    rows = {row.partition: row for row in response.context["rows"]}
    assert response.context["broker_error"] is None
    queued = rows[partition_for(key)]
    assert queued.depth == 3 and queued.status is not None and queued.status.worker == "w1@host"
    assert not queued.silent
    if broker.startswith("redis"):
        assert queued.oldest_age is not None and queued.oldest_age < 60
    assert rows[data["blocked"].partition].blocked >= 1
    assert rows[data["retrying"].partition].retrying >= 1
    assert not queued.stalled and b"stalled: nothing moved" not in response.content
    index = _client(users["viewer"]).get(reverse("admin:index")).content.decode()
    assert reverse(PARTITIONS) in index
    # Nothing of the partition started or ended for two minutes while its messages wait: stalled.
    long_ago = timezone.now() - timedelta(minutes=2)
    PartitionStatus.objects.filter(partition=partition_for(key)).update(progress_at=long_ago,
                                                                        consumer_since=long_ago)
    response = _client(users["viewer"]).get(reverse(PARTITIONS))
    assert {row.partition for row in response.context["rows"] if row.stalled} == {partition_for(key)}
    assert b"stalled: nothing moved for 120 s" in response.content


def test_a_worker_logs_a_partition_whose_messages_wait_while_nothing_moves(
        app: Celery, broker: str, caplog: pytest.LogCaptureFixture) -> None:
    import time

    from ordered_tasks.worker.health.figures import STALL_AFTER, PartitionFigures, warn_about_stalls
    from tests.testapp.tasks import ordered_record

    waiting, empty = "acct-waiting", "acct-empty"
    while partition_for(empty) == partition_for(waiting):
        empty += "x"
    app.tasks[ordered_record.name].delay(run="r", key=waiting, seq=1)
    now = time.time()
    figures = Figures()
    for key in (waiting, empty):
        figures.partitions[partition_for(key)] = PartitionFigures(progress_at=now - STALL_AFTER - 5)
    owned = {partition_for(waiting), partition_for(empty)}
    warn_about_stalls(figures, owned, broker, now - STALL_AFTER)  # not quiet for long enough yet
    assert "has not moved" not in caplog.text
    warn_about_stalls(figures, owned, broker, now)
    assert caplog.text.count("has not moved") == 1
    assert f"Partition {partition_for(waiting)} has not moved for 65 s although its queue holds 1" in caplog.text
    warn_about_stalls(figures, owned, broker, now + 10)  # the same stall is not logged again at once
    assert caplog.text.count("has not moved") == 1


@pytest.mark.parametrize("down", ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1//"])
def test_the_partitions_page_says_when_the_broker_is_down(data: dict[str, AccountState], users: dict[str, User],
                                                          monkeypatch: pytest.MonkeyPatch, down: str) -> None:
    from ordered_tasks import dashboard

    monkeypatch.setattr(dashboard, "broker_url", lambda: down)
    response = _client(users["viewer"]).get(reverse(PARTITIONS))
    assert response.status_code == 200
    assert b"The broker cannot be reached" in response.content
    assert all(row.depth is None for row in response.context["rows"])


def test_figures_are_written_in_batches(data: dict[str, AccountState],
                                        django_assert_max_num_queries: Any) -> None:
    """However many tasks ended, one batch is a handful of queries."""
    figures = Figures()
    figures.worker = "w2@host"
    key = data["blocked"].key
    partition = data["blocked"].partition
    for n in range(500):
        request = type("R", (), {"name": "t", "id": str(n), "_request_dict": {
            "ordered_key": key, "ordered_partition": partition,
            "ordered_published_at": timezone.now().timestamp() - 2}})()
        figures.started(request)
        if n % 100 == 0:
            figures.failed(request)
        figures.ended(request)
    AccountState.objects.filter(key=key).update(last_activity=timezone.now() - timedelta(hours=1))
    with django_assert_max_num_queries(4):
        write(figures, {partition})
    status = PartitionStatus.objects.get(partition=partition)
    assert (status.worker, status.completed, status.failed) == ("w2@host", 500, 5)
    assert status.per_minute > 0
    assert status.last_wait is not None and 1.5 < status.last_wait < 30
    assert status.consumer_since is not None and not status.running_task
    assert AccountState.objects.get(key=key).last_activity > timezone.now() - timedelta(minutes=1)
