"""A crowded key's waiting messages parked in one batch: the database side, and pool calls that always report."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.concurrency.solo import TaskPool as SoloPool
from celery.concurrency.thread import TaskPool as ThreadPool
from django.utils import timezone

from ordered_tasks import partition_for
from ordered_tasks.conf import get_settings
from ordered_tasks.models import AccountState, ParkedMessage
from ordered_tasks.states import KeyStatus
from ordered_tasks.worker.delivery import Delivery, json_safe
from ordered_tasks.worker.failures import control, spill, store
from ordered_tasks.worker.failures.book import BOOK
from ordered_tasks.worker.pooled import SideThread, run_in_pool
from ordered_tasks.worker.sequencing.window import spill_at, spillable
from tests.support.workload import parked, ran, same_partition_keys
from tests.testapp.celery import app as celery_app

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
def wakes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys whose wake-up was published (nothing goes to a broker)."""
    published: list[str] = []
    monkeypatch.setattr(spill, "publish_wake", lambda app, key, due: published.append(key))
    monkeypatch.setattr(control, "publish_control", lambda app, key, action, **kw: published.append(key))
    return published


class _Message:
    """A delivered message as kombu hands it over."""

    def __init__(self, key: str, seq: int, run: str, headers: dict[str, Any] | None = None) -> None:
        self.headers = {"task": T + "ordered_record", "id": str(uuid.uuid4()), "ordered_key": key,
                        "ordered_partition": partition_for(key), **(headers or {})}
        self.body = json.dumps([[], {"run": run, "key": key, "seq": seq}, {}]).encode()
        self.content_type, self.content_encoding = "application/json", "utf-8"
        self.delivery_info: dict[str, Any] = {"redelivered": False}


def _deliveries(key: str, run: str, seqs: range) -> list[Delivery]:
    return [spill.spilled_delivery(_Message(key, seq, run), partition_for(key), key) for seq in seqs]


@pytest.mark.django_db
def test_a_spill_parks_in_order_holds_the_key_once_and_never_parks_a_copy_twice(wakes: list[str]) -> None:
    key = same_partition_keys(1)[0]
    partition = partition_for(key)
    first = _deliveries(key, "r", range(1, 5))
    state, held_now = store.spill(key, partition, first)
    assert held_now and state.status == KeyStatus.RETRYING and state.retry_at is not None
    state, held_now = store.spill(key, partition, [first[3], *_deliveries(key, "r", range(5, 7))])
    assert not held_now  # already held: its wake-up is on its way
    rows = ParkedMessage.objects.filter(key=key).order_by("position")
    assert [json.loads(bytes(r.body))[1]["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert parked(key) == [("overflow", "parked")] * 6


@pytest.mark.django_db
def test_a_spill_behind_a_blocked_key_waits_for_the_operator(wakes: list[str]) -> None:
    key = same_partition_keys(1)[0]
    partition = partition_for(key)
    store.block(key, partition, delivery=_deliveries(key, "r", range(1, 2))[0], error="boom")
    spill.spill_in_worker(key, partition, _deliveries(key, "r", range(2, 6)))
    assert wakes == []
    assert AccountState.objects.get(key=key).status == KeyStatus.BLOCKED
    assert [reason for reason, _ in parked(key)] == ["failed"] + ["overflow"] * 4


@pytest.mark.django_db(transaction=True)
def test_the_drain_runs_spilled_messages_in_order_and_then_the_key_is_active(
        app: Celery, results: redis.Redis, wakes: list[str]) -> None:
    run, key = uuid.uuid4().hex, same_partition_keys(1)[0]
    partition = partition_for(key)
    assert spill.spill_in_worker(key, partition, _deliveries(key, run, range(1, 6))) == "retrying"
    assert wakes == [key] and BOOK.status(key, partition) == KeyStatus.RETRYING
    assert control.drain(app, key, partition) == "active"
    assert ran(results, run, key) == [1, 2, 3, 4, 5]
    assert not ParkedMessage.objects.filter(key=key).exists()


@pytest.mark.django_db(transaction=True)
def test_a_message_spilled_while_the_drain_runs_is_not_left_behind_an_active_key(
        app: Celery, results: redis.Redis, wakes: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A spill may park beside a running drain: the key stays held until that one ran too."""
    run, key = uuid.uuid4().hex, same_partition_keys(1)[0]
    partition = partition_for(key)
    spill.spill_in_worker(key, partition, _deliveries(key, run, range(1, 3)))
    run_parked = control.run_parked
    late = _deliveries(key, run, range(3, 5))

    def run_and_spill(app: Celery, row: ParkedMessage) -> Any:
        outcome = run_parked(app, row)
        if late:  # the consumer parks more of the key while the drain runs its first message
            spill.spill_in_worker(key, partition, [late.pop(0) for _ in range(2)])
        return outcome

    monkeypatch.setattr(control, "run_parked", run_and_spill)
    assert control.drain(app, key, partition) == "retrying"  # not active: two were parked meanwhile
    assert AccountState.objects.get(key=key).status == KeyStatus.RETRYING
    assert wakes.count(key) == 2  # the spill's, and the drain's to go on
    assert control.drain(app, key, partition) == "active"
    assert ran(results, run, key) == [1, 2, 3, 4]


@pytest.mark.django_db
def test_a_compressed_message_is_parked_as_its_task_reads_it() -> None:
    from kombu.compression import compress
    from kombu.message import Message

    key = same_partition_keys(1)[0]
    plain = _Message(key, 1, "r")
    body, kind = compress(plain.body, "zlib")
    received = Message(body=body, headers={**plain.headers, "compression": kind},  # kombu decompresses it
                       content_type="application/json", content_encoding="utf-8")
    delivery = spill.spilled_delivery(received, partition_for(key), key)
    assert json.loads(delivery.body)[1]["seq"] == 1 and "compression" not in delivery.headers


def test_only_a_first_delivery_whose_headers_agree_with_its_key_and_queue_may_be_spilled() -> None:
    key = same_partition_keys(1)[0]
    partition = partition_for(key)
    assert spillable(_Message(key, 1, "r"), partition, key)
    redelivered = _Message(key, 1, "r")
    redelivered.delivery_info["redelivered"] = True
    assert not spillable(redelivered, partition, key)
    assert not spillable(_Message(key, 1, "r", {"ordered_key": key + "x"}), partition, key)
    assert not spillable(_Message(key, 1, "r", {"ordered_partition": partition + 1}), partition, key)
    assert not spillable(_Message(key, 1, "r"), partition + 1, key)  # another partition's queue
    assert not spillable(_Message(key, 1, "r", {"ordered_key": None}), partition, key)


def test_a_key_spills_only_in_batches_worth_the_database() -> None:
    assert spill_at(16) == 8 and spill_at(64) == 32
    assert spill_at(4) == 0 and spill_at(1) == 0  # a burst of one account's events stays in the window


def _boom(text: str) -> str:
    raise RuntimeError(text)


def _double(n: int) -> int:
    return 2 * n


@pytest.mark.parametrize("make_pool", [lambda: ThreadPool(limit=2), lambda: SoloPool(limit=1)],
                         ids=["threads", "solo"])
def test_a_call_in_the_pool_reports_its_failure_with_every_pool(make_pool: Any) -> None:
    """Celery's threads pool drops what a function raises, and ignores ``error_callback``."""
    pool = make_pool()
    pool.start()
    try:
        reports: list[tuple[str, Any]] = []
        done = threading.Event()

        def report(kind: str) -> Any:
            return lambda value: (reports.append((kind, value)), done.set())

        run_in_pool(pool, _boom, ("no database",), done=report("done"), failed=report("failed"))
        assert done.wait(10)
        assert reports == [("failed", "RuntimeError('no database')")]
        done.clear()
        run_in_pool(pool, _double, (21,), done=report("done"), failed=report("failed"))
        assert done.wait(10)
        assert reports[-1] == ("done", 42)
    finally:
        pool.stop()



@pytest.mark.django_db
def test_a_wake_up_that_cannot_be_published_does_not_undo_the_spill(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    key = same_partition_keys(1)[0]
    partition = partition_for(key)

    def no_broker(app: Any, key: str, due: Any) -> None:
        raise ConnectionError("broker gone")

    monkeypatch.setattr(spill, "publish_wake", no_broker)
    monkeypatch.setattr(spill.time, "sleep", lambda _s: None)
    status = spill.spill_in_worker(key, partition, _deliveries(key, "r", range(1, 5)))
    assert status == "retrying" and len(parked(key)) == 4  # parked: the messages are acknowledged
    assert "could not be published" in caplog.text


@pytest.mark.django_db
def test_nothing_is_spilled_once_the_lease_may_have_lapsed_or_the_partition_moved(
        wakes: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from ordered_tasks.worker.exclusivity.fencing import DEADLINES
    from ordered_tasks.worker.failures.book import Versions

    key = same_partition_keys(1)[0]
    partition = partition_for(key)
    deliveries = _deliveries(key, "r", range(1, 5))
    monkeypatch.setattr(DEADLINES, "allows", lambda p: p != partition)
    with pytest.raises(spill.LeaseLapsed, match="lapsed"):
        spill.spill_in_worker(key, partition, deliveries)
    monkeypatch.undo()
    versions = Versions(get_settings().partitions)
    BOOK.share(versions, [partition])
    try:
        tenure = versions.get(partition)[1]
        versions.arrived(partition)  # the partition's messages arrive again: a new tenure
        with pytest.raises(spill.LeaseLapsed, match="tenure"):
            spill.spill_in_worker(key, partition, deliveries, None, tenure)
        assert parked(key) == [] and wakes == []
        assert spill.spill_in_worker(key, partition, deliveries, None, versions.get(partition)[1]) == "retrying"
    finally:
        BOOK.versions = None


@pytest.mark.django_db
def test_a_record_under_the_same_task_id_does_not_keep_a_new_message_from_being_parked(
        wakes: list[str]) -> None:
    key = same_partition_keys(1)[0]
    partition = partition_for(key)
    delivery = _deliveries(key, "r", range(1, 2))[0]
    store.record_failure(key, partition, delivery=delivery, error="boom", trace="", attempts=1)
    store.spill(key, partition, [delivery])
    assert parked(key) == [("failed", "failed"), ("overflow", "parked")]


class _Keeper:
    def fence_of(self, partition: int) -> int | None:
        return None


def test_a_worker_without_the_partitions_lease_does_not_spill(monkeypatch: pytest.MonkeyPatch) -> None:
    from ordered_tasks.worker.sequencing.lanes import Lanes

    key = same_partition_keys(1)[0]
    partition = partition_for(key)
    lanes = Lanes(key_limit=4)
    started: list[str] = []
    messages = {}
    for n in range(6):
        messages[n] = _Message(key, n, "r")
        lanes.admit(n, partition, key, lambda n=n: started.append(n), messages[n])
    jobs: list[Any] = []
    monkeypatch.setattr(spill.SIDE, "submit", lambda *args, **kwargs: jobs.append(args))
    worker = type("Worker", (), {"keeper": _Keeper()})()
    lanes.spill = lambda p, k, batch: spill.spill_over(worker, lanes, p, k, batch)
    lanes.settled(0)
    assert jobs == []  # nothing handed to the spill thread
    assert started == [0, 1]  # back in the lane, one at a time, marked as redelivered for the guard
    assert messages[1].delivery_info["redelivered"] is True


def test_a_spill_that_cannot_be_handed_over_stays_in_the_window() -> None:
    from ordered_tasks.worker.sequencing.lanes import Lanes

    lanes = Lanes(key_limit=3)
    started: list[str] = []

    def broken(partition: int, key: str, batch: list[Any]) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")

    lanes.spill = broken
    for n in range(5):
        lanes.admit(f"a{n}", 0, "a", lambda n=n: started.append(f"a{n}"))
    lanes.settled("a0")
    assert started == ["a0", "a1"]


def test_a_partition_dropped_before_its_spill_was_handed_over_spills_nothing() -> None:
    from ordered_tasks.worker.sequencing.lanes import Lanes

    deferred: list[Any] = []
    spilled: list[Any] = []
    lanes = Lanes(key_limit=3, run_on_loop=deferred.append)
    lanes.spill = lambda partition, key, batch: spilled.append(batch)
    for n in range(5):
        lanes.admit(f"a{n}", 0, "a", lambda: None)
    for call in deferred:
        call()
    deferred.clear()
    lanes.settled("a0")  # the spill is queued for the loop
    lanes.drop_partition(0)  # the partition went back to its queue first
    for call in deferred:
        call()
    assert spilled == []


def test_a_side_thread_runs_jobs_in_order_and_reports_each() -> None:
    side = SideThread("test-side")
    reports: list[tuple[str, Any]] = []
    done = threading.Event()
    for n in range(5):
        side.submit(_double, (n,), done=lambda v: reports.append(("done", v)), failed=lambda e: None)
    side.submit(_boom, ("gone",), done=lambda v: None,
                failed=lambda e: (reports.append(("failed", e)), done.set()))
    assert done.wait(10)
    assert reports == [("done", 0), ("done", 2), ("done", 4), ("done", 6), ("done", 8),
                       ("failed", "RuntimeError('gone')")]


@pytest.mark.django_db
def test_rows_inserted_in_one_copy_read_back_as_django_would_have_saved_them() -> None:
    """The spill's ``COPY`` (PostgreSQL) stores every field as ``bulk_create`` does."""
    from django.db import connection

    from ordered_tasks.worker.failures.bulk import insert_parked

    headers = {"nested": {"list": [1, 2.5, None, True], "text": "é ✓ \\ \" \t\n"}, "empty": {},
               "not json": (b"raw", (3, 4))}
    body = b"\x00\x01 \\N \t\n\xff" + "é".encode()

    def rows(key: str) -> list[dict[str, Any]]:
        return [dict(key=key, partition=3, position=n, reason=ParkedMessage.Reason.OVERFLOW,
                     task_name="t", task_id=f"id-{n}", body=body, content_type="application/json",
                     content_encoding="utf-8", headers={**headers, "n": n}) for n in (1, 2)]

    before = timezone.now()
    assert insert_parked(rows("copied")) == 2
    after = timezone.now()
    ParkedMessage.objects.bulk_create([ParkedMessage(**{**row, "headers": json_safe(row["headers"])})
                                       for row in rows("created")])
    assert insert_parked([]) == 0
    fields = [f.attname for f in ParkedMessage._meta.concrete_fields
              if f.attname not in ("id", "key", "created_at", "updated_at")]

    def stored(key: str) -> list[dict[str, Any]]:
        found = list(ParkedMessage.objects.filter(key=key).order_by("position")
                     .values(*fields, "created_at", "updated_at"))
        for row in found:
            if key == "copied":  # the same instant as Django would have written, time zone and all
                assert before <= row.pop("created_at") <= after and before <= row.pop("updated_at") <= after
            else:
                row.pop("created_at"), row.pop("updated_at")
        return [{**row, "body": bytes(row["body"])} for row in found]

    assert stored("copied") == stored("created") and len(stored("copied")) == 2
    assert stored("copied")[0]["body"] == body and stored("copied")[1]["headers"]["n"] == 2
    assert stored("copied")[0]["headers"]["not json"] == ["b'raw'", [3, 4]]  # what is not JSON: its repr
    assert connection.vendor == "postgresql"  # the test database: the COPY path ran


@pytest.mark.django_db(transaction=True)
def test_a_database_that_refuses_copy_gets_its_rows_with_insert_from_then_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Row-level security, or a PostgreSQL-compatible server without ``COPY``: that spill fails (its
    messages go back to their lane) and the next one inserts."""
    import psycopg
    from django.db import NotSupportedError, transaction

    from ordered_tasks.worker.failures import bulk

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise psycopg.errors.FeatureNotSupported("COPY FROM not supported with row-level security")

    monkeypatch.setattr(bulk._Copy, "works", True)
    monkeypatch.setattr(psycopg.Cursor, "copy", refuse)
    key = same_partition_keys(1)[0]
    row = dict(key=key, partition=partition_for(key), position=1, reason=ParkedMessage.Reason.OVERFLOW,
               body=b"{}", headers={"not json": b"raw"})
    with pytest.raises(NotSupportedError), transaction.atomic():
        bulk.insert_parked([row])
    assert not bulk._Copy.works and "refused COPY" in caplog.text
    assert bulk.insert_parked([row]) == 1
    assert ParkedMessage.objects.filter(key=key).count() == 1
    assert ParkedMessage.objects.get(key=key).headers == {"not json": "b'raw'"}  # as COPY writes it


@pytest.mark.django_db
def test_the_spill_thread_parks_the_messages_as_their_tasks_read_them(wakes: list[str]) -> None:
    """The messages are read into rows on the spill's thread: a compressed one decompressed, in order."""
    from kombu.compression import compress
    from kombu.message import Message

    key = same_partition_keys(1)[0]
    partition = partition_for(key)
    messages: list[Any] = [_Message(key, seq, "r") for seq in (1, 2, 3)]
    body, kind = compress(messages[1].body, "zlib")
    messages[1] = Message(body=body, headers={**messages[1].headers, "compression": kind},
                          content_type="application/json", content_encoding="utf-8")
    assert spill.park_messages(key, partition, messages) == "retrying"
    rows = ParkedMessage.objects.filter(key=key).order_by("position")
    assert [json.loads(bytes(r.body))[1]["seq"] for r in rows] == [1, 2, 3]
    assert all("compression" not in r.headers and r.reason == ParkedMessage.Reason.OVERFLOW for r in rows)
    assert wakes == [key]


@pytest.mark.django_db(transaction=True)
def test_a_locked_key_row_reads_as_the_orm_reads_it_and_is_written_back_field_by_field() -> None:
    """``locked_row``'s own statement (PostgreSQL) gives the row the ORM gives, and locks it until its
    transaction ends; ``write`` stores only the fields it is given, with the row's activity."""
    import psycopg
    from django.db import connection, transaction
    from django.db.transaction import TransactionManagementError

    from ordered_tasks.models import _select_for_update, locked_row

    key = same_partition_keys(1)[0]
    AccountState.objects.create(key=key, partition=partition_for(key), status=KeyStatus.RETRYING, epoch=3,
                                sequence=12, retry_at=timezone.now(), last_error="é \\ ✓", failures=2)
    fields = [f.attname for f in AccountState._meta.concrete_fields]
    with transaction.atomic():
        locked = locked_row(AccountState, {"key": key})
        read = AccountState.objects.get(key=key)
        assert [getattr(locked, name) for name in fields] == [getattr(read, name) for name in fields]
        assert locked.retry_at is not None and locked.retry_at.tzinfo is not None
        assert not locked._state.adding and locked._state.db == read._state.db
        settings = connection.settings_dict
        with psycopg.connect(host=settings["HOST"] or None, port=settings["PORT"] or None,
                             user=settings["USER"], dbname=settings["NAME"], autocommit=True) as other:
            with pytest.raises(psycopg.errors.LockNotAvailable):
                other.execute(f"SELECT 1 FROM {AccountState._meta.db_table} WHERE key = %s FOR UPDATE NOWAIT",
                              [key])
        before = timezone.now()
        locked.sequence, locked.status, locked.failures = 13, KeyStatus.ACTIVE, 99  # failures: not written
        locked.write(["sequence", "status"])
    written = AccountState.objects.get(key=key)
    assert (written.sequence, written.status, written.failures, written.epoch) == (13, "active", 2, 3)
    assert written.updated_at >= before and written.last_activity is not None and written.last_activity >= before
    with transaction.atomic():
        assert _select_for_update(AccountState, {"key": key + "-none"}) is None
    with pytest.raises(TransactionManagementError):  # a lock outside a transaction would hold nothing
        locked_row(AccountState, {"key": key})
    assert connection.vendor == "postgresql"  # the statement of its own ran
