"""Publishing: every way of sending an ordered task lands on its key's partition, bad input raises."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, chain
from celery.exceptions import Retry
from django.db import transaction
from kombu import Queue

from ordered_tasks import InvalidKeyError, UnsafeOptionError, ordered_task, partition_for
from ordered_tasks.options import KEY_HEADER, PARTITION_HEADER
from tests.conftest import ordered_queues, queue_depths

ORDERED = "tests.testapp.tasks.ordered_record"


def take_all(app: Celery, name: str) -> list[Any]:
    """Every message waiting in queue ``name`` (removed from it)."""
    taken = []
    with app.connection_for_write() as conn:
        queue = Queue(name)(conn.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            taken.append(message)
    return taken


def where(app: Celery) -> dict[int, list[Any]]:
    """Messages by partition, taken off the ordered queues."""
    found = {}
    for number, queue in enumerate(ordered_queues()):
        messages = take_all(app, queue.name)
        if messages:
            found[number] = messages
    return found


def assert_only_in_partition_of(app: Celery, key: Any, count: int = 1) -> list[Any]:
    found = where(app)
    assert list(found) == [partition_for(key)], found
    messages = found[partition_for(key)]
    assert len(messages) == count
    for message in messages:
        assert message.headers[KEY_HEADER] == str(key)
        assert message.headers[PARTITION_HEADER] == partition_for(key)
    return messages


def test_delay_apply_async_and_signatures_route_by_key(app: Celery) -> None:
    task = app.tasks[ORDERED]
    task.delay("r", "acct-7", 1)
    task.apply_async(kwargs={"run": "r", "key": "acct-7", "seq": 2})
    task.s(run="r", key="acct-7", seq=3).apply_async()
    task.si("r", "acct-7", 4).delay()
    messages = assert_only_in_partition_of(app, "acct-7", count=4)
    assert messages[0].payload[0] == ["r", "acct-7", 1]


def test_chain_takes_key_by_keyword(app: Celery) -> None:
    task = app.tasks[ORDERED]
    chain(task.si(run="r", key=99, seq=1), task.si(run="r", key=99, seq=2)).apply_async()
    assert_only_in_partition_of(app, 99, count=1)  # the second is published by the worker


@pytest.mark.parametrize("later", [
    lambda t: t.si(run="r", key=99, seq=2).set(countdown=5),
    lambda t: t.si(run="r", key=99, seq=2).set(queue="elsewhere"),
    lambda t: t.s("r", 99, 2),  # positional key: the first step's result would take its place
])
def test_a_chain_whose_later_ordered_step_would_fail_is_refused_at_publish(app: Celery, later: Any) -> None:
    task = app.tasks[ORDERED]
    with pytest.raises(UnsafeOptionError, match="later step"):
        chain(task.si(run="r", key=99, seq=1), later(task)).apply_async()
    with pytest.raises(UnsafeOptionError, match="later step"):
        app.tasks["tests.testapp.tasks.plain_record"].apply_async(("r", 1, 1), link=later(task))
    with pytest.raises(UnsafeOptionError, match="later step"):
        task.apply_async(kwargs={"run": "r", "key": 99, "seq": 1}, link_error=later(task))
    assert where(app) == {}


def test_a_chain_of_ordered_steps_with_keyword_keys_is_accepted(app: Celery) -> None:
    task = app.tasks[ORDERED]
    chain(task.si(run="r", key=99, seq=1), task.s(run="r", key=99, seq=2),
          task.si("r", 99, 3)).apply_async()
    assert_only_in_partition_of(app, 99, count=1)
    # A key function may read the key from the previous result: it is known only then.
    chain(task.si(run="r", key=99, seq=4), app.tasks["tests.callable_key"].s(run="r")).apply_async()
    assert_only_in_partition_of(app, 99, count=1)


def test_callable_key(app: Celery) -> None:
    app.tasks["tests.callable_key"].delay({"account": "acme", "seq": 1}, run="r")
    assert_only_in_partition_of(app, "acme")


@pytest.mark.django_db(transaction=True)
def test_on_commit_variants_publish_after_commit(app: Celery) -> None:
    task = app.tasks[ORDERED]
    with transaction.atomic():
        task.delay_on_commit("r", "k-commit", 1)
        task.apply_async_on_commit(kwargs={"run": "r", "key": "k-commit", "seq": 2})
        assert where(app) == {}
    assert_only_in_partition_of(app, "k-commit", count=2)


@pytest.mark.django_db(transaction=True)
def test_on_commit_variants_raise_at_call_time(app: Celery) -> None:
    task = app.tasks[ORDERED]
    with transaction.atomic():
        with pytest.raises(InvalidKeyError):
            task.delay_on_commit("r", "", 1)
        with pytest.raises(UnsafeOptionError):
            task.apply_async_on_commit(kwargs={"run": "r", "key": "k", "seq": 1}, countdown=5)


def test_send_task_by_name_from_a_producer_without_the_task(app: Celery) -> None:
    app.send_task(ORDERED, kwargs={"run": "r", "key": "remote-1", "seq": 1})
    app.send_task("events.anything", kwargs={"run": "r", "key": "remote-1", "seq": 2})
    assert_only_in_partition_of(app, "remote-1", count=2)


def test_a_key_header_alone_does_not_skip_routing(app: Celery) -> None:
    app.send_task(ORDERED, kwargs={"run": "r", "key": "hdr", "seq": 1}, headers={KEY_HEADER: "hdr"})
    assert_only_in_partition_of(app, "hdr")


def test_plain_tasks_keep_their_routing(app: Celery) -> None:
    from django.conf import settings

    app.tasks["tests.testapp.tasks.plain_record"].delay("r", "k", 1)
    assert where(app) == {}
    assert len(take_all(app, settings.PLAIN_QUEUE)) == 1


@pytest.mark.parametrize("bad_key", [None, "", True, 1.5, ["a"]])
def test_bad_keys_raise_before_the_broker(app: Celery, bad_key: Any) -> None:
    with pytest.raises(InvalidKeyError, match="ordering key"):
        app.tasks[ORDERED].delay("r", bad_key, 1)
    with pytest.raises(InvalidKeyError):
        app.send_task(ORDERED, kwargs={"run": "r", "key": bad_key, "seq": 1})
    assert sum(queue_depths(app).values()) == 0


def test_missing_key_says_what_to_do(app: Celery) -> None:
    with pytest.raises(InvalidKeyError, match=r"without its ordering key .*'key'.*by keyword"):
        app.tasks[ORDERED].apply_async(kwargs={"run": "r", "seq": 1})
    with pytest.raises(InvalidKeyError, match="without its ordering key"):
        app.send_task("events.anything", kwargs={"run": "r"})


@pytest.mark.parametrize("option", [
    {"countdown": 5}, {"eta": "2030-01-01T00:00:00+00:00"}, {"expires": 60}, {"priority": 3},
    {"queue": "elsewhere"}, {"exchange": "x"}, {"routing_key": "rk"},
])
def test_unsafe_options_raise_on_every_path(app: Celery, option: dict[str, Any]) -> None:
    task = app.tasks[ORDERED]
    name = next(iter(option))
    with pytest.raises(UnsafeOptionError, match=name):
        task.apply_async(("r", "k", 1), **option)
    with pytest.raises(UnsafeOptionError, match=name):
        task.s("r", "k", 1).set(**option).apply_async()
    with pytest.raises(UnsafeOptionError, match=name):
        app.send_task(ORDERED, kwargs={"run": "r", "key": "k", "seq": 1}, **option)
    with pytest.raises(UnsafeOptionError, match=name):
        app.send_task("events.x", kwargs={"run": "r", "key": "k", "seq": 1}, **option)
    assert sum(queue_depths(app).values()) == 0


def test_hand_picked_ordered_queue_is_refused(app: Celery) -> None:
    from ordered_tasks.conf import get_settings

    conf = get_settings()
    wrong = (partition_for("k") + 1) % conf.partitions
    with pytest.raises(UnsafeOptionError, match=f"queue='{conf.queue_prefix}.{wrong}'"):
        app.send_task("events.x", kwargs={"run": "r", "key": "k", "seq": 1},
                      queue=f"{conf.queue_prefix}.{wrong}")
    with pytest.raises(UnsafeOptionError, match=f"belongs to partition {partition_for('k')}"):
        app.send_task(ORDERED, kwargs={"run": "r", "key": "k", "seq": 1}, headers={KEY_HEADER: "k"},
                      queue=f"{conf.queue_prefix}.{wrong}")
    with pytest.raises(UnsafeOptionError, match="not an ordered task"):
        app.tasks["tests.testapp.tasks.plain_record"].apply_async(("r", "k", 1), queue=f"{conf.queue_prefix}.0")
    assert sum(queue_depths(app).values()) == 0


def test_decorator_rejects_unknown_parameter() -> None:
    with pytest.raises(InvalidKeyError, match=r"has no parameter 'acount_id' \(it has account_id, n\)"):
        @ordered_task(key="acount_id")
        def typo(account_id: int, n: int) -> None: ...


@pytest.mark.parametrize("options", [
    {"queue": "q"}, {"priority": 1}, {"rate_limit": "1/s"}, {"acks_late": False}, {"expires": 10},
    {"failure_policy": "ignore"},
])
def test_decorator_rejects_unsafe_options(options: dict[str, Any]) -> None:
    with pytest.raises(UnsafeOptionError, match="@ordered_task on"):
        @ordered_task(key="account_id", **options)
        def task(account_id: int) -> None: ...


def test_decorator_keeps_shared_task_options(app: Celery) -> None:
    name = f"tests.bound.{app.main}"

    @ordered_task(key="account_id", name=name, bind=True, ignore_result=True)
    def bound(self: Any, account_id: int) -> str:
        return f"{self.name}:{account_id}"

    task = app.tasks[name]
    assert task.ignore_result and task.acks_late
    assert task.run(5) == f"{name}:5"
    task.delay(account_id=5)
    assert_only_in_partition_of(app, 5)


def test_decorator_accepts_celery_retry_options(app: Celery) -> None:
    name = f"tests.retrying.{app.main}"

    @ordered_task(key="account_id", name=name, autoretry_for=(ValueError,), retry_backoff=True,
                  retry_backoff_max=30, retry_jitter=False, max_retries=4)
    def retrying(account_id: int) -> None: ...

    task = app.tasks[name]
    assert (task.retry_backoff, task.retry_backoff_max, task.max_retries) == (True, 30, 4)
    assert task.default_retry_delay == 2 and task.failure_policy == "block"


def test_retry_outside_a_worker_behaves_as_in_celery(app: Celery) -> None:
    with pytest.raises(Retry):
        app.tasks[ORDERED].retry(countdown=1)


def test_ordered_publishes_on_redis_reuse_one_client_object(app: Celery) -> None:
    from django.conf import settings

    from ordered_tasks.redisclient import reused_client

    task = app.tasks[ORDERED]
    with app.producer_or_acquire() as producer:
        channel = producer.channel
        if app.connection_for_write().transport.driver_type != "redis":
            with reused_client(channel):  # other transports are left alone
                assert "_create_client" not in vars(channel)
            return
        made: list[Any] = []
        make = channel.Client

        def counting_client(**kwargs: Any) -> Any:
            made.append(kwargs)
            return make(**kwargs)

        channel.Client = counting_client
        try:
            for seq in range(1, 21):
                task.apply_async(kwargs={"run": "r", "key": "acct-9", "seq": seq}, producer=producer)
            ordered = len(made)
            app.tasks["tests.testapp.tasks.plain_record"].apply_async(("r", "k", 1), producer=producer)
            plain = len(made) - ordered
        finally:
            channel.Client = make  # the pooled channel is used again by later tests
    assert ordered <= 1  # kombu makes one per command: here one for all 20 publishes
    assert plain >= 1  # plain tasks keep kombu's behaviour
    assert "_create_client" not in vars(channel)
    messages = assert_only_in_partition_of(app, "acct-9", count=20)
    assert [m.payload[1]["seq"] for m in messages] == list(range(1, 21))
    assert len(take_all(app, settings.PLAIN_QUEUE)) == 1


def test_the_installed_router_finds_a_task_sent_by_name_without_celery_handing_it_over(app: Celery) -> None:
    """Celery before 5.7 hands routers no task for ``send_task``: the app's router looks it up itself."""
    from ordered_tasks import install, queue_for
    from ordered_tasks.routing import AppRouter, route_task

    router = app.conf.task_routes[0]
    assert isinstance(router, AppRouter) and router.app is app
    kwargs = {"run": "r", "key": "by-name", "seq": 1}
    assert route_task(ORDERED, (), kwargs, {}, task=None) is None  # not in ROUTES: unknown without the task
    assert router(ORDERED, (), kwargs, {}, task=None)["queue"].name == queue_for("by-name")
    routes = app.conf.task_routes
    install(app)
    assert app.conf.task_routes == routes  # installing again changes nothing


def test_install_replaces_a_router_listed_by_hand_with_the_apps_own() -> None:
    from ordered_tasks import install
    from ordered_tasks.routing import AppRouter

    other = {"a.b": {"queue": "q"}}
    app = Celery("listed-router", set_as_current=False)
    app.conf.task_routes = ("ordered_tasks.routing.route_task", other)
    install(app)
    first, *rest = app.conf.task_routes
    assert isinstance(first, AppRouter) and first.app is app
    assert rest == [other]
