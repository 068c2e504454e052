"""The consumer's guard, run in-process through Celery's tracer as a worker runs it."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from celery.app.trace import trace_task
from django.core.management import call_command
from django.utils import timezone

from ordered_tasks import KeyNotBlockedError, UnknownKeyError, partition_for, replay, skip
from ordered_tasks.conf import get_settings
from ordered_tasks.exceptions import StaleOwnerError, UnsafeOptionError
from ordered_tasks.models import AccountState, ControlRequest, ParkedMessage, PartitionFence
from ordered_tasks.queues import partition_queue
from ordered_tasks.signals import key_blocked, key_resumed
from ordered_tasks.states import ControlAction
from ordered_tasks.worker.delivery import TENURE_ENTRY, Delivery
from ordered_tasks.worker.exclusivity.fencing import DEADLINES, FENCE, TENURE
from ordered_tasks.worker.failures.book import BOOK, Versions
from ordered_tasks.worker.failures.control import apply_control, wake
from ordered_tasks.worker.sequencing.claims import CLAIMS, Begin, Claims
from tests.conftest import eventually
from tests.support.workload import fail, ran, same_partition_keys
from tests.testapp.celery import app as celery_app

pytestmark = pytest.mark.django_db
REPLAY, SKIP = ControlAction.REPLAY, ControlAction.SKIP
T = "tests.testapp.tasks."


@pytest.fixture(autouse=True)
def fresh_book() -> Iterator[None]:
    BOOK.forget()
    yield
    BOOK.forget()


@pytest.fixture
def app(results: redis.Redis) -> Celery:
    celery_app.finalize(auto=True)
    return celery_app


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex


def deliver(app: Celery, name: str, key: str, seq: int, run: str, retries: int = 0,
            task_id: str | None = None, redelivered: bool = False,
            entries: dict[str, Any] | None = None) -> Any:
    """Run one message the way the worker's pool process does; return Celery's trace info."""
    task = app.tasks[T + name]
    task_id = task_id or str(uuid.uuid4())
    kwargs = {"run": run, "key": key, "seq": seq}
    queue = partition_queue(get_settings().queue_prefix, partition_for(key)).name
    request = {
        "id": task_id, "task": task.name, "retries": retries, "ordered_key": key,
        "ordered_partition": partition_for(key), "is_eager": False, "hostname": "test@host",
        "delivery_info": {"exchange": "", "routing_key": queue, "priority": None,
                          "redelivered": redelivered},
        "ordered_content": ["application/json", "utf-8"], "args": [], "kwargs": kwargs, **(entries or {}),
    }
    _, info, _, _ = trace_task(task, task_id, [], kwargs, request, app=app)
    return info


def test_happy_path_costs_no_query(app: Celery, run: str, results: redis.Redis,
                                   django_assert_num_queries: Any) -> None:
    keys = same_partition_keys(3)
    with django_assert_num_queries(1):  # the consumer's first message of a partition loads its held keys
        deliver(app, "strict_step", keys[0], 1, run)
    with django_assert_num_queries(0):
        for seq in range(2, 12):
            for key in keys:
                assert deliver(app, "strict_step", key, seq, run) is None
    assert ran(results, run, keys[1]) == list(range(2, 12))


def test_failure_blocks_only_its_key_and_parks_what_follows(app: Celery, run: str,
                                                            results: redis.Redis) -> None:
    bad, good = same_partition_keys(2)
    fail(results, run, bad, 2)
    blocked: list[dict[str, Any]] = []
    key_blocked.connect(lambda **kw: blocked.append(kw), weak=False, dispatch_uid="t-blocked")
    try:
        for seq in (1, 2, 3):
            deliver(app, "strict_step", bad, seq, run)
            deliver(app, "strict_step", good, seq, run)
        deliver(app, "strict_step", bad, 4, run)
    finally:
        key_blocked.disconnect(dispatch_uid="t-blocked")
    assert ran(results, run, bad) == [1]
    assert ran(results, run, good) == [1, 2, 3]
    state = AccountState.objects.get(key=bad)
    assert (state.status, state.failures, state.blocks, state.partition) == ("blocked", 1, 1, partition_for(bad))
    assert "Boom: " in state.last_error
    rows = list(ParkedMessage.objects.filter(key=bad).order_by("position"))
    assert [(r.reason, r.state) for r in rows] == [("failed", "parked"), ("key_held", "parked"),
                                                   ("key_held", "parked")]
    assert [r.attempts for r in rows] == [1, 0, 0]
    assert "failed on purpose" in rows[0].traceback
    assert rows[0].task_name == T + "strict_step"
    assert [len(blocked), blocked[0]["key"], blocked[0]["task_id"]] == [1, bad, rows[0].task_id]
    assert not AccountState.objects.filter(key=good).exists()


def test_replay_runs_parked_messages_in_order_then_the_key_is_active(app: Celery, run: str,
                                                                     results: redis.Redis) -> None:
    key = same_partition_keys(1)[0]
    fail(results, run, key, 2)
    for seq in (1, 2, 3, 4):
        deliver(app, "strict_step", key, seq, run)
    results.delete(f"{run}:fail:{key}:2")
    request = replay(key, requested_by="alice")
    assert (request.action, request.requested_by, request.applied_at) == (REPLAY, "alice", None)
    resumed: list[str] = []
    key_resumed.connect(lambda key, **_: resumed.append(key), weak=False, dispatch_uid="t-resumed")
    try:
        assert apply_control(app, key, REPLAY, request.pk) == "active"
    finally:
        key_resumed.disconnect(dispatch_uid="t-resumed")
    assert ran(results, run, key) == [1, 2, 3, 4]
    assert resumed == [key]
    assert not ParkedMessage.objects.filter(key=key).exists()
    state = AccountState.objects.get(key=key)
    assert (state.status, state.replays) == ("active", 1)
    request.refresh_from_db()
    assert request.applied_at is not None and "active" in request.outcome
    deliver(app, "strict_step", key, 5, run)
    assert ran(results, run, key) == [1, 2, 3, 4, 5]


def test_repeated_request_for_one_incident_applies_once(app: Celery, run: str, results: redis.Redis) -> None:
    key = same_partition_keys(1)[0]
    fail(results, run, key, 1)
    deliver(app, "strict_step", key, 1, run)
    deliver(app, "strict_step", key, 2, run)
    first, second = skip(key), skip(key)
    assert apply_control(app, key, SKIP, first.pk) == "active"
    assert apply_control(app, key, SKIP, second.pk).startswith("nothing to do")
    assert ran(results, run, key) == [2]
    assert list(ParkedMessage.objects.filter(key=key).values_list("state", flat=True)) == ["skipped"]
    second.refresh_from_db()
    assert second.outcome == "nothing to do: the key is active"


def test_failure_during_replay_blocks_again_with_the_rest_parked(app: Celery, run: str,
                                                                 results: redis.Redis) -> None:
    key = same_partition_keys(1)[0]
    fail(results, run, key, 1)
    fail(results, run, key, 2, times=1)
    for seq in (1, 2, 3):
        deliver(app, "strict_step", key, seq, run)
    results.delete(f"{run}:fail:{key}:1")
    assert apply_control(app, key, REPLAY, replay(key).pk) == "blocked"
    assert ran(results, run, key) == [1]
    rows = list(ParkedMessage.objects.filter(key=key).order_by("position"))
    assert [(r.reason, r.attempts) for r in rows] == [("failed", 1), ("key_held", 0)]
    assert AccountState.objects.get(key=key).blocks == 2
    assert apply_control(app, key, REPLAY, replay(key).pk) == "active"
    assert ran(results, run, key) == [1, 2, 3]


def test_retry_waits_in_place_and_wakes_up(app: Celery, run: str, results: redis.Redis) -> None:
    key, other = same_partition_keys(2)
    fail(results, run, key, 1, times=1)
    info = deliver(app, "autoretry_step", key, 1, run)
    assert info.state == "RETRY"
    deliver(app, "autoretry_step", key, 2, run)
    deliver(app, "autoretry_step", other, 1, run)
    state = AccountState.objects.get(key=key)
    assert (state.status, state.retries) == ("retrying", 1)
    head = ParkedMessage.objects.filter(key=key).order_by("position").first()
    assert head is not None and head.reason == "retrying" and head.headers["retries"] == 1
    assert head.due_at is not None and head.due_at > timezone.now()
    assert wake(app, key, partition_for(key), due=head.due_at) == "not due yet"
    stale = head.due_at - timedelta(seconds=30)
    assert wake(app, key, partition_for(key), due=stale) == "nothing to do: a later retry is scheduled"
    AccountState.objects.filter(key=key).update(retry_at=timezone.now() - timedelta(seconds=1))
    assert wake(app, key, partition_for(key)) == "active"
    assert ran(results, run, key) == [1, 2]
    assert ran(results, run, other) == [1]


def test_retries_exhausted_block_the_key(app: Celery, run: str, results: redis.Redis) -> None:
    key = same_partition_keys(1)[0]
    fail(results, run, key, 1)
    deliver(app, "autoretry_step", key, 1, run)
    for _ in range(3):
        AccountState.objects.filter(key=key).update(retry_at=timezone.now())
        wake(app, key, partition_for(key))
    state = AccountState.objects.get(key=key)
    assert (state.status, state.retries, state.failures) == ("blocked", 3, 4)
    assert int(results.get(f"{run}:attempts:{key}:1") or 0) == 4


def test_self_retry_keeps_celery_meaning(app: Celery, run: str, results: redis.Redis) -> None:
    key = same_partition_keys(1)[0]
    fail(results, run, key, 1, times=2)
    assert deliver(app, "self_retry_step", key, 1, run).state == "RETRY"
    for _ in range(2):
        AccountState.objects.filter(key=key).update(retry_at=timezone.now())
        wake(app, key, partition_for(key))
    assert ran(results, run, key) == [1]
    assert results.lrange(f"{run}:retries:{key}", 0, -1) == ["2"]


def test_continue_policy_records_the_failure_and_goes_on(app: Celery, run: str, results: redis.Redis) -> None:
    key = same_partition_keys(1)[0]
    fail(results, run, key, 1)
    deliver(app, "lenient_step", key, 1, run)
    deliver(app, "lenient_step", key, 2, run)
    assert ran(results, run, key) == [2]
    state = AccountState.objects.get(key=key)
    assert (state.status, state.failures) == ("active", 1)
    row = ParkedMessage.objects.get(key=key)
    assert (row.state, row.reason) == ("failed", "failed")


def test_replay_and_skip_refuse_keys_with_nothing_to_do(app: Celery) -> None:
    with pytest.raises(UnknownKeyError, match="has ever failed"):
        replay("nobody")
    AccountState.objects.create(key="fine", partition=partition_for("fine"))
    with pytest.raises(KeyNotBlockedError, match="active"):
        skip("fine")
    assert not ControlRequest.objects.exists()


def test_retry_refuses_options_that_would_move_the_message(app: Celery) -> None:
    task = app.tasks[T + "self_retry_step"]
    task.push_request(id="x", ordered_key="k", ordered_partition=0, retries=0, is_eager=False,
                      called_directly=False)
    try:
        with pytest.raises(UnsafeOptionError, match="queue"):
            task.retry(queue="elsewhere")
    finally:
        task.pop_request()


def test_stored_body_runs_as_the_original(app: Celery) -> None:
    task = app.tasks[T + "strict_step"]
    task.push_request(id="abc", ordered_key="k", ordered_partition=3, retries=0, is_eager=False,
                      ordered_content=["application/json", "utf-8"], callbacks=None)
    try:
        delivery = Delivery.from_request(task, task.request, [], {"run": "r", "key": "k", "seq": 1})
    finally:
        task.pop_request()
    assert (delivery.key, delivery.partition, delivery.task_id) == ("k", 3, "abc")
    assert delivery.content_type == "application/json"
    assert delivery.body.startswith(b'[[], {"run": "r", "key": "k", "seq": 1}')
    assert delivery.headers["task"] == task.name


def test_no_missing_migrations() -> None:
    call_command("makemigrations", "ordered_tasks", "--check", "--dry-run", verbosity=0)


def test_a_message_that_cannot_be_parked_goes_back_to_the_broker(app: Celery, run: str, results: redis.Redis,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import OperationalError

    from ordered_tasks.worker.failures import guard, store

    def database_down(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("database is down")

    monkeypatch.setattr(guard, "REQUEUE_PAUSE", 0)
    monkeypatch.setattr(store, "block", database_down)
    key = same_partition_keys(1)[0]
    fail(results, run, key, 1)
    info = deliver(app, "strict_step", key, 1, run)
    assert info.state == "REJECTED" and info.retval.requeue
    assert BOOK.status(key, partition_for(key)) == "active"


def test_a_redelivered_copy_of_a_completed_or_parked_task_does_not_run_again(
        app: Celery, run: str, results: redis.Redis) -> None:
    key = same_partition_keys(1)[0]
    deliver(app, "strict_step", key, 1, run, task_id="first")
    assert deliver(app, "strict_step", key, 1, run, task_id="first", redelivered=True).state == "IGNORED"
    assert deliver(app, "strict_step", key, 2, run, task_id="second", redelivered=True) is None
    assert ran(results, run, key) == [1, 2]
    # An acknowledgement lost with a broker connection can bring a copy back later on.
    assert deliver(app, "strict_step", key, 1, run, task_id="first", redelivered=True).state == "IGNORED"
    assert ran(results, run, key) == [1, 2]
    fail(results, run, key, 3)
    deliver(app, "strict_step", key, 3, run, task_id="third")
    deliver(app, "strict_step", key, 3, run, task_id="third", redelivered=True)
    assert len(ParkedMessage.objects.filter(key=key)) == 1


def test_a_redelivered_copy_of_a_task_that_raised_ignore_does_not_run_again(
        app: Celery, run: str, results: redis.Redis) -> None:
    """``Task.replace`` raises ``Ignore`` after publishing the replacement: a copy must not publish it twice."""
    key = same_partition_keys(1)[0]
    assert deliver(app, "ignoring_step", key, 1, run, task_id="replaced").state == "IGNORED"
    assert deliver(app, "ignoring_step", key, 1, run, task_id="replaced", redelivered=True).state == "IGNORED"
    assert ran(results, run, key) == [1]


def test_the_completion_ledger_remembers_a_bounded_number_of_tasks(results: redis.Redis) -> None:
    from ordered_tasks.worker.redelivery import ledger as ledgers

    prefix = f"ledger-{uuid.uuid4().hex[:8]}"
    ledger = ledgers.Ledger(results, prefix)
    written = ledgers.LEDGER_SIZE + 2 * ledgers.TRIM_EVERY
    for n in range(written):
        ledger.record(3, f"task-{n}")
    ledger.flush()
    assert not ledger.completed(3, "task-0")
    kept = written - ledgers.LEDGER_SIZE  # the trim at the last multiple of TRIM_EVERY kept the rest
    assert ledger.completed(3, f"task-{kept}") and ledger.completed(3, f"task-{written - 1}")
    assert not ledger.completed(2, f"task-{kept}")
    assert ledgers.LEDGER_SIZE <= results.zcard(ledger._key(3)) < ledgers.LEDGER_SIZE + ledgers.TRIM_EVERY
    results.delete(ledger._key(3))


def test_completions_in_the_consumers_process_are_sent_before_the_next_acknowledgement(
        results: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the consumer runs tasks itself (threads, solo), a completion waits for the next
    acknowledgement, which sends every waiting one first; a pool process sends its own at once."""
    from ordered_tasks.worker.redelivery import ledger as ledgers

    prefix = f"ledger-{uuid.uuid4().hex[:8]}"
    ledger = ledgers.Ledger(results, prefix)
    monkeypatch.setattr(ledgers, "_LEDGERS", {("app", prefix): ledger})
    monkeypatch.setattr(ledgers, "_ACKNOWLEDGES_HERE", -1)  # a prefork pool process
    ledger.record(1, "sent-at-once")
    ledger.writer.flush()
    assert results.zscore(ledger._key(1), "sent-at-once") is not None
    monkeypatch.setattr(ledgers, "_ACKNOWLEDGES_HERE", os.getpid())  # the consumer's process
    ledger.record(1, "noted")
    ledger.record(2, "noted-too")
    ledger.writer.flush()
    assert results.zscore(ledger._key(1), "noted") is None
    ledgers.flush_completions()
    ledger.writer.flush()
    assert results.zscore(ledger._key(1), "noted") is not None
    assert results.zscore(ledger._key(2), "noted-too") is not None
    ledger.record(3, "asked")  # a read sends what waits first
    assert ledger.completed(3, "asked")
    results.delete(ledger._key(1), ledger._key(2), ledger._key(3))


def test_a_task_whose_result_is_stored_sends_its_completion_at_once(
        app: Celery, run: str, results: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Noted completions wait for the next acknowledgement, unless the result backend's write
    (and more) comes first: then it is sent right after the body."""
    from ordered_tasks.worker.redelivery import ledger as ledgers

    monkeypatch.setattr(ledgers, "_ACKNOWLEDGES_HERE", os.getpid())
    ledger = ledgers.ledger_for(app)
    assert ledger is not None
    key = same_partition_keys(1)[0]
    deliver(app, "strict_step", key, 1, run, task_id=f"noted-{run}")
    assert ledger._noted == ledger._sent + 1  # waits for the acknowledgement
    monkeypatch.setattr(app.tasks[T + "strict_step"], "ignore_result", False)
    deliver(app, "strict_step", key, 2, run, task_id=f"stored-{run}")
    assert ledger._sent == ledger._noted  # sent at once, with the one that waited
    assert ledger.completed(partition_for(key), f"stored-{run}")


def test_a_thread_whose_completion_another_thread_sends_waits_for_that_send(
        results: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    from ordered_tasks.worker.redelivery import ledger as ledgers

    ledger = ledgers.Ledger(results, f"ledger-{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(ledgers, "_ACKNOWLEDGES_HERE", os.getpid())
    sending, release, sent = threading.Event(), threading.Event(), []

    def slow_send(*commands: tuple[object, ...]) -> None:
        sending.set()
        assert release.wait(10)
        sent.extend(command[3] for command in commands)

    monkeypatch.setattr(ledger.writer, "send", slow_send)
    ledger.record(1, "a")
    first = threading.Thread(target=ledger.send_noted)
    first.start()
    assert sending.wait(10)
    ledger.record(1, "b")  # noted while "a" is on its way: a later send takes it
    returned = threading.Event()
    second = threading.Thread(target=lambda: (ledger.send_noted(), returned.set()))
    second.start()
    assert not returned.wait(0.3)  # "b" has not left: its acknowledgement must wait
    release.set()
    assert returned.wait(10)
    first.join(10)
    second.join(10)
    assert sent == ["a", "b"]


def test_threads_asking_at_once_share_one_ledger(redis_broker: str, apps: dict[str, Celery],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Pool threads asking for the ledger at once get the same one: a second, made by a racing
    thread, would replace the first, whose collection closes connections still in use."""
    from ordered_tasks.worker.redelivery import ledger as ledgers
    from tests.conftest import make_app

    app = make_app(redis_broker)
    monkeypatch.setattr(ledgers, "_LEDGERS", {})
    made = ledgers.coordination_client

    def slow_client(app: Any, **kwargs: Any) -> Any:
        time.sleep(0.01)  # the time a racing thread needs to ask too
        return made(app, **kwargs)

    monkeypatch.setattr(ledgers, "coordination_client", slow_client)
    start = threading.Barrier(8)
    got: list[Any] = []

    def ask() -> None:
        start.wait(timeout=10)
        got.append(ledgers.ledger_for(app))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    app.close()
    assert len(got) == 8 and all(ledger is got[0] for ledger in got) and got[0] is not None


def test_a_stale_owner_cannot_change_key_states(app: Celery, run: str, results: redis.Redis) -> None:
    from ordered_tasks.exceptions import StaleOwnerError
    from ordered_tasks.models import PartitionFence
    from ordered_tasks.worker.exclusivity.fencing import FENCE
    from ordered_tasks.worker.failures import store

    key = same_partition_keys(1)[0]
    partition = partition_for(key)
    token = FENCE.set(5)
    try:
        store.activate(key, partition)
        assert PartitionFence.objects.get(partition=partition).fence == 5
        FENCE.set(4)
        with pytest.raises(StaleOwnerError, match="newer owner"):
            store.block(key, partition, error="late")
    finally:
        FENCE.reset(token)
    fail(results, run, key, 1)
    task = app.tasks[T + "strict_step"]
    task.push_request(id="t", ordered_key=key, ordered_partition=partition, retries=0, is_eager=False,
                      called_directly=False, ordered_fence=3, args=[], kwargs={},
                      delivery_info={"redelivered": False})
    try:
        from celery.exceptions import Reject

        with pytest.raises(Reject, match="newer owner") as handed_back:
            task(run=run, key=key, seq=1)
        assert handed_back.value.requeue  # never acknowledged: the new owner may hold its tag
    finally:
        task.pop_request()
    assert AccountState.objects.get(key=key).status == "active"


def test_retry_with_new_arguments_runs_the_new_ones_in_place(app: Celery, run: str,
                                                              results: redis.Redis) -> None:
    key = same_partition_keys(1)[0]
    assert deliver(app, "rewriting_step", key, 1, run).state == "RETRY"  # live: a new parked row
    assert wake(app, key, partition_for(key)) == "retrying"  # replayed row retries again, rewritten
    assert wake(app, key, partition_for(key)) == "active"
    assert ran(results, run, key) == [201]


def test_unanswered_writes_reach_redis_and_their_replies_are_read_together(
        results: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    from ordered_tasks.worker import unanswered

    key = f"unanswered-{uuid.uuid4().hex[:8]}"
    writer = unanswered.Unanswered(results.connection_pool, "a test")
    results.set(f"{key}:string", "x")
    writer.send(("ZADD", f"{key}:string", 1, "a"))  # refused: wrong type, logged when read
    for n in range(unanswered.UNREAD_LIMIT - 1):
        writer.send(("RPUSH", key, n))
    assert writer._unread == unanswered.UNREAD_LIMIT  # nothing read yet, nothing waited for
    eventually(lambda: results.llen(key) == unanswered.UNREAD_LIMIT - 1, timeout=5.0,
               what="the unanswered writes to reach Redis")
    assert "refused a write" not in caplog.text
    writer.send(("RPUSH", key, "last"))  # reads the waiting replies first
    assert writer._unread == 1 and "refused a write of a test" in caplog.text
    assert writer.ask("LLEN", key) == unanswered.UNREAD_LIMIT and writer._unread == 0
    results.delete(key, f"{key}:string")


def test_pool_processes_sharing_a_worker_see_each_others_key_changes(
        django_assert_num_queries: Any) -> None:
    """Two books stand for two pool processes of one worker, sharing the change counters."""
    from ordered_tasks.worker.failures.book import KeyBook, Versions

    key = f"shared-{uuid.uuid4().hex[:8]}"
    partition = partition_for(key)
    first, second = KeyBook(), KeyBook()
    versions = Versions(get_settings().partitions)
    first.share(versions)
    second.share(versions)
    assert first.status(key, partition) == second.status(key, partition) == "active"
    with django_assert_num_queries(0):  # the happy path: no query once a partition is read
        assert first.status(key, partition) == "active"
    # The second process blocks the key while running the partition's message...
    AccountState.objects.create(key=key, partition=partition, status="blocked")
    second.set(key, partition, "blocked")
    with django_assert_num_queries(0):
        assert second.status(key, partition) == "blocked"
    # ...and the first one, running the partition's next message, reads the partition again.
    with django_assert_num_queries(1):
        assert first.status(key, partition) == "blocked"
    with django_assert_num_queries(0):
        assert first.status(key, partition) == "blocked"
    # A book of one process alone (no sharing) would have answered from its stale copy.
    alone = KeyBook()
    alone.load(partition)
    AccountState.objects.filter(key=key).update(status="active")
    assert alone.status(key, partition) == "blocked"
    second.set(key, partition, "active")
    assert first.status(key, partition) == "active"


def test_a_partition_the_worker_gets_back_is_read_again(django_assert_num_queries: Any) -> None:
    """Another worker may change key states while this one lost the partition (a new connection, a lease)."""
    from ordered_tasks.worker.failures.book import KeyBook, Versions

    key = f"regained-{uuid.uuid4().hex[:8]}"
    partition = partition_for(key)
    versions = Versions(get_settings().partitions)
    book = KeyBook()
    book.share(versions, [partition])
    versions.arrived(partition)  # the main process, for each message before the pool runs it
    assert book.status(key, partition) == "active"
    # Meanwhile another worker held the partition and blocked the key.
    AccountState.objects.create(key=key, partition=partition, status="blocked")
    versions.arrived(partition)
    with django_assert_num_queries(0):  # the same tenure: the book cannot know
        assert book.status(key, partition) == "active"
    versions.new_tenure()  # a new broker connection (a lease acquired: new_tenure([partition]))
    with django_assert_num_queries(0):  # nothing of the partition arrived yet
        assert book.status(key, partition) == "active"
    versions.arrived(partition)
    with django_assert_num_queries(1):
        assert book.status(key, partition) == "blocked"
    versions.arrived(partition)
    versions.new_tenure([partition + 1])  # another partition's lease: this one stays current
    versions.arrived(partition)
    with django_assert_num_queries(0):
        assert book.status(key, partition) == "blocked"


def test_one_query_reads_every_out_of_date_partition_of_the_worker(django_assert_num_queries: Any) -> None:
    from ordered_tasks.worker.failures.book import KeyBook, Versions

    partitions = list(range(min(4, get_settings().partitions)))
    tag = uuid.uuid4().hex[:8]
    names = (f"wide-{tag}-{n}" for n in range(10_000))
    keys: dict[int, str] = {}
    for name in names:
        keys.setdefault(partition_for(name), name)
        if all(p in keys for p in partitions):
            break
    held = partitions[-1]
    AccountState.objects.create(key=keys[held], partition=held, status="retrying")
    versions = Versions(get_settings().partitions)
    book = KeyBook()
    book.share(versions, partitions)
    with django_assert_num_queries(1):  # a pool process's first message reads all the worker's partitions
        assert book.status(keys[partitions[0]], partitions[0]) == "active"
    with django_assert_num_queries(0):
        assert [book.status(keys[p], p) for p in partitions] == ["active"] * (len(partitions) - 1) + ["retrying"]
    versions.arrived(held)  # the first message of a tenure: that partition alone is out of date
    with django_assert_num_queries(1):
        assert book.status(keys[held], held) == "retrying"
    with django_assert_num_queries(0):
        assert [book.status(keys[p], p) for p in partitions] == ["active"] * (len(partitions) - 1) + ["retrying"]


@pytest.fixture
def deadlines() -> Iterator[Any]:
    DEADLINES.share(8)
    DEADLINES.enforce()
    yield DEADLINES
    DEADLINES.share(0)
    DEADLINES._memory = None


@pytest.mark.django_db
def test_a_message_does_not_start_once_its_partition_lease_may_have_lapsed(
        app: Celery, run: str, results: redis.Redis, deadlines: Any) -> None:
    key = f"lapsed-{run[:8]}"
    partition = partition_for(key)
    deadlines.set(partition, time.monotonic() - 0.1)
    info = deliver(app, "strict_step", key, 1, run)
    assert info is not None and info.state == "REJECTED"  # handed back to the head, not run
    assert ran(results, run, key) == []
    deadlines.set(partition, time.monotonic() + 10)
    assert deliver(app, "strict_step", key, 2, run) is None
    assert ran(results, run, key) == [2]


@pytest.mark.django_db
@pytest.mark.parametrize("action", [REPLAY, SKIP])
def test_replay_or_skip_by_a_stale_owner_runs_nothing_and_changes_nothing(
        app: Celery, run: str, results: redis.Redis, django_capture_on_commit_callbacks: Any,
        action: ControlAction) -> None:
    key = f"stale-{run[:8]}"
    partition = partition_for(key)
    fail(results, run, key, 1, times=1)
    for seq in (1, 2, 3):
        deliver(app, "strict_step", key, seq, run)
    assert AccountState.objects.get(key=key).status == "blocked"
    with django_capture_on_commit_callbacks(execute=False):
        request = (replay if action == REPLAY else skip)(key)
    PartitionFence.objects.update_or_create(partition=partition, defaults={"fence": 5})
    token = FENCE.set(3)  # this worker's lease is older than the partition's newest owner
    try:
        with pytest.raises(StaleOwnerError):
            apply_control(app, key, action, request.pk)
    finally:
        FENCE.reset(token)
    assert ran(results, run, key) == []
    assert AccountState.objects.get(key=key).status == "blocked"
    assert list(ParkedMessage.objects.filter(key=key).values_list("state", flat=True)) == ["parked"] * 3


@pytest.mark.django_db
def test_a_parked_message_revoked_meanwhile_is_set_aside_by_replay(app: Celery, run: str,
                                                                   results: redis.Redis) -> None:
    from celery.worker import state as worker_state

    key = f"revoked-{run[:8]}"
    fail(results, run, key, 1, times=1)
    revoked_id = str(uuid.uuid4())
    deliver(app, "strict_step", key, 1, run)
    deliver(app, "strict_step", key, 2, run, task_id=revoked_id)
    deliver(app, "strict_step", key, 3, run)
    worker_state.revoked.add(revoked_id)
    try:
        assert apply_control(app, key, REPLAY, replay(key).pk) == "active"
    finally:
        worker_state.revoked.discard(revoked_id)
    assert ran(results, run, key) == [1, 3]
    row = ParkedMessage.objects.get(task_id=revoked_id)
    assert row.state == "skipped" and "Revoked while parked" in row.exception


@pytest.mark.django_db
def test_a_replay_handed_back_midway_wakes_its_key_again(app: Celery, run: str, results: redis.Redis,
                                                         deadlines: Any) -> None:
    key = f"handback-{run[:8]}"
    partition = partition_for(key)
    deadlines.set(partition, time.monotonic() + 10)
    fail(results, run, key, 1, times=1)
    for seq in (1, 2):
        deliver(app, "strict_step", key, seq, run)
    deadlines.set(partition, time.monotonic() - 0.1)  # the lease may have lapsed
    assert apply_control(app, key, REPLAY, replay(key).pk) == "retrying"
    assert ran(results, run, key) == [] and AccountState.objects.get(key=key).status == "retrying"
    deadlines.set(partition, time.monotonic() + 10)  # the wake-up it published reaches an owner
    assert wake(app, key, partition) == "active"
    assert ran(results, run, key) == [1, 2]


@pytest.mark.django_db
def test_parking_an_unrunnable_message_is_fenced(run: str) -> None:
    import dataclasses

    from ordered_tasks.worker.failures.unrunnable import park_in_worker

    key = f"fenced-{run[:8]}"
    partition = partition_for(key)
    delivery = Delivery(key=key, partition=partition, task_name="gone.task", task_id=run, body=b"[]")
    PartitionFence.objects.update_or_create(partition=partition, defaults={"fence": 5})
    with pytest.raises(StaleOwnerError):
        park_in_worker(dataclasses.asdict(delivery), "unknown_task", "No task named gone.task.", fence=4)
    assert not ParkedMessage.objects.filter(key=key).exists()
    park_in_worker(dataclasses.asdict(delivery), "unknown_task", "No task named gone.task.", fence=5)
    assert AccountState.objects.get(key=key).status == "blocked"


def test_a_partition_first_seen_is_not_idle_yet() -> None:
    from ordered_tasks.worker.health.figures import STALL_AFTER, Figures

    figures = Figures()
    now = time.time()
    assert figures.idle({3}, now) == []  # a takeover: quiet from now on, not since forever
    assert figures.idle({3}, now + STALL_AFTER + 1) == [3]


@pytest.mark.django_db
def test_a_copy_of_a_message_that_completed_in_a_replay_is_recognised(app: Celery, run: str,
                                                                       results: redis.Redis) -> None:
    key = f"replayed-{run[:8]}"
    fail(results, run, key, 1, times=1)
    deliver(app, "strict_step", key, 1, run, task_id=f"{run}-1")
    assert apply_control(app, key, REPLAY, replay(key).pk) == "active"
    assert ran(results, run, key) == [1]
    # A copy of it comes back (its first delivery's acknowledgement was lost with a stale owner):
    copy = deliver(app, "strict_step", key, 1, run, task_id=f"{run}-1", redelivered=True)
    assert copy is not None and copy.state == "IGNORED"
    assert ran(results, run, key) == [1]


def test_a_count_goes_on_when_a_dead_process_left_the_counters_locked(monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from ordered_tasks.worker.failures import book

    monkeypatch.setattr(book, "LOCK_WAIT", 0.2)
    versions = book.Versions(4)
    before = versions.get(2)
    versions._lock.acquire()  # as a pool process killed inside its count would leave it
    stamps: list[Any] = []
    counting = threading.Thread(target=lambda: stamps.append(versions.bump(2)), daemon=True)
    counting.start()
    counting.join(5)  # a deadline: before the fix, the count waited for ever
    assert not counting.is_alive(), "the count is still waiting for the lock"
    assert stamps[0][0] == before[0] + 1
    assert "counting without it" in caplog.text


@pytest.fixture
def claims(monkeypatch: pytest.MonkeyPatch) -> Iterator[Claims]:
    """The process's claims, as with a pool that runs tasks in this process (restored after)."""
    monkeypatch.setattr(CLAIMS, "enabled", True)
    yield CLAIMS
    CLAIMS._by_id.clear()


def _taken_back(claims: Claims, task_id: str, outcome: Begin, key: str) -> None:
    claim = claims.new(task_id, key)
    assert claim is not None and claim.withdraw()
    claim.resolve(outcome)


def test_a_task_a_spill_took_back_and_parked_ends_without_running_or_a_query(
        app: Celery, run: str, results: redis.Redis, claims: Claims, django_assert_num_queries: Any) -> None:
    key = same_partition_keys(1)[0]
    _taken_back(claims, "taken", Begin.PARKED, key)
    with django_assert_num_queries(0):
        info = deliver(app, "strict_step", key, 1, run, task_id="taken")
    assert info is not None and info.state == "IGNORED"  # acknowledged: its parked row runs it later
    assert ran(results, run, key) == [] and len(claims) == 0
    assert deliver(app, "strict_step", key, 2, run, task_id="next") is None  # no claim: it runs
    assert ran(results, run, key) == [2]


def test_a_task_whose_spill_failed_runs_unless_the_spill_wrote_it_after_all(
        app: Celery, run: str, results: redis.Redis, claims: Claims, monkeypatch: pytest.MonkeyPatch) -> None:
    from ordered_tasks.worker.failures import spill
    from tests.test_spill import _Message

    monkeypatch.setattr(spill, "publish_wake", lambda app, key, due: None)
    key, other = same_partition_keys(2)
    message = _Message(key, 1, run)
    spill.park_messages(key, partition_for(key), [message])  # written, then the spill "failed"
    _taken_back(claims, message.headers["id"], Begin.CHECK, key)
    info = deliver(app, "strict_step", key, 1, run, task_id=message.headers["id"])
    assert info is not None and info.state == "IGNORED"  # recognised as parked: not run twice
    _taken_back(claims, "not-written", Begin.CHECK, other)
    assert deliver(app, "strict_step", other, 1, run, task_id="not-written") is None
    assert ran(results, run, key) == [] and ran(results, run, other) == [1]
    assert ParkedMessage.objects.filter(key=key).count() == 1


@pytest.fixture
def tenures(monkeypatch: pytest.MonkeyPatch) -> Versions:
    """The worker's shared counters, as a RabbitMQ worker has them (its tenures end with a connection)."""
    versions = Versions(get_settings().partitions)
    monkeypatch.setattr(BOOK, "versions", versions)
    return versions


def test_a_message_of_a_lost_connection_does_not_start(app: Celery, run: str, results: redis.Redis,
                                                       tenures: Versions) -> None:
    key = f"lost-{run[:8]}"
    partition = partition_for(key)
    tenures.arrived(partition)
    old = tenures.tenure(partition)
    assert deliver(app, "strict_step", key, 1, run, entries={TENURE_ENTRY: old}) is None
    tenures.end_tenures()  # the consumer connected again: RabbitMQ gave the queue's messages back
    info = deliver(app, "strict_step", key, 2, run, entries={TENURE_ENTRY: old})
    assert info is not None and info.state == "REJECTED" and info.retval.requeue  # still in the pool's queue
    assert ran(results, run, key) == [1]
    tenures.new_tenure()
    tenures.arrived(partition)  # its copy arrives on the new connection
    assert deliver(app, "strict_step", key, 2, run, entries={TENURE_ENTRY: tenures.tenure(partition)}) is None
    assert ran(results, run, key) == [1, 2]


def test_a_replay_begun_before_its_connection_was_lost_stops_at_its_next_message(
        app: Celery, run: str, results: redis.Redis, tenures: Versions) -> None:
    key = f"replay-lost-{run[:8]}"
    partition = partition_for(key)
    fail(results, run, key, 1, times=1)
    for seq in (1, 2):
        deliver(app, "strict_step", key, seq, run)
    old = tenures.tenure(partition)
    tenures.end_tenures()
    token = TENURE.set(old)  # the replay's control message arrived on the lost connection
    try:
        assert apply_control(app, key, REPLAY, replay(key).pk) == "retrying"
    finally:
        TENURE.reset(token)
    assert ran(results, run, key) == [] and AccountState.objects.get(key=key).status == "retrying"
    assert wake(app, key, partition) == "active"  # its wake-up, on the connection of now
    assert ran(results, run, key) == [1, 2]
