"""Fixtures: real brokers, a Celery app per broker, and ordered_worker launched as users do."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Queue
from kombu.exceptions import OperationalError

from tests.services import BROKERS, RESULTS_URL, require

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    import tests.testapp.tasks  # noqa: F401  (registers the test tasks on every app)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier; tests that restart a shared broker run last.

    Tiers: unit (no marker: no service needed), ``integration`` (real
    brokers, Redis or PostgreSQL), ``e2e`` (ordered worker processes, so
    also ``integration``), ``browser`` (Chromium, also ``e2e``). A test
    that uses ``start_workers`` is ``e2e`` without saying so. Tests that
    restart a broker leave stale pooled connections behind.
    """
    for item in items:
        if "start_workers" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: item.get_closest_marker("restarts_broker") is not None)


@pytest.fixture(scope="session")
def results() -> redis.Redis:
    require(RESULTS_URL, 6379, "Redis (results)")
    return redis.Redis.from_url(RESULTS_URL, decode_responses=True)


@pytest.fixture(params=sorted(BROKERS), scope="session")
def broker(request: pytest.FixtureRequest) -> str:
    url = BROKERS[request.param]
    require(url, 6379 if url.startswith("redis") else 5672, request.param)
    return url


@pytest.fixture
def rabbitmq() -> str:
    """RabbitMQ's URL (skipped locally, a failure in CI, when it does not answer)."""
    url = BROKERS["rabbitmq"]
    require(url, 5672, "rabbitmq")
    return url


@pytest.fixture(scope="session")
def redis_broker() -> str:
    url = BROKERS["redis"]
    require(url, 6379, "redis")
    return url


def make_app(broker_url: str) -> Celery:
    """A Celery app like a producer's: Django settings, another broker, the plugin installed."""
    from django.conf import settings

    from ordered_tasks import install

    app = Celery(f"tests-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(broker_url=broker_url, task_ignore_result=True, task_routes=settings.CELERY_TASK_ROUTES,
                    broker_connection_retry_on_startup=True)
    install(app)
    app.finalize(auto=True)
    return app


@pytest.fixture(scope="session")
def apps() -> Iterator[dict[str, Celery]]:
    made: dict[str, Celery] = {}
    yield made
    for app in made.values():
        app.close()


@pytest.fixture
def app(broker: str, apps: dict[str, Celery]) -> Celery:
    if broker not in apps:
        apps[broker] = make_app(broker)
    purge_all(apps[broker])
    return apps[broker]


def ordered_queues() -> list[Queue]:
    from ordered_tasks.conf import get_settings
    from ordered_tasks.queues import partition_queue

    conf = get_settings()
    return [partition_queue(conf.queue_prefix, p) for p in range(conf.partitions)]


def purge_all(app: Celery) -> None:
    from django.conf import settings

    with app.connection_for_write() as conn:
        for queue in [*ordered_queues(), Queue(settings.PLAIN_QUEUE)]:
            bound = queue(conn.default_channel)
            bound.declare()
            bound.purge()
        if conn.transport.driver_type == "redis":  # what a worker set aside for busy keys too
            for queue in ordered_queues():
                drop_set_aside(conn.default_channel.client, queue.name)


def drop_set_aside(client: Any, name: str) -> None:
    """Delete what a worker set aside for busy keys from the Redis queue ``name``."""
    from ordered_tasks.redisscripts import aside_index, aside_lists

    client.delete(aside_index(name), *aside_lists(client.smembers(aside_index(name)), name).values())


def unacknowledged_queues(channel: Any) -> list[str]:
    """The queue of every message a Redis broker holds unacknowledged (one entry per message)."""
    from kombu.utils.json import loads

    return [loads(p)[2] for p in channel.client.hgetall(channel.unacked_key).values()]


def queue_depths(app: Celery) -> dict[str, int]:
    """Messages waiting in each ordered queue.

    On Redis this includes the messages a stopped worker left unacknowledged
    (the partition's next owner puts them back at the head of the queue), and
    those it set aside for busy keys.
    """
    depths = {}
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        on_redis = conn.transport.driver_type == "redis"
        unacked = unacknowledged_queues(channel) if on_redis else []
        for queue in ordered_queues():
            _, count, _ = queue(channel).queue_declare()
            aside = _set_aside(channel, queue.name) if on_redis else 0
            depths[queue.name] = count + unacked.count(queue.name) + aside
    return depths


def _set_aside(channel: Any, name: str) -> int:
    """Messages of the Redis queue ``name`` that a worker set aside for busy keys."""
    from ordered_tasks.redisscripts import aside_index, aside_lists

    client = channel.client
    return sum(int(client.llen(listed)) for listed in aside_lists(client.smembers(aside_index(name)), name).values())


def children(pid: int) -> list[int]:
    """Direct children of ``pid``: a launcher's workers, a worker's pool processes."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


class Workers:
    """``manage.py ordered_worker`` running in a subprocess, as an operator starts it."""

    def __init__(self, app: Celery, broker_url: str, processes: int, extra: list[str],
                 window: int | None = None) -> None:
        self.app = app
        self.terminating = False
        self.name = f"t{uuid.uuid4().hex[:6]}"
        self.processes = processes
        from django.db import connection

        env = {**os.environ, "TEST_BROKER_URL": broker_url, "PYTHONPATH": str(ROOT),
               "DJANGO_SETTINGS_MODULE": "tests.settings"}
        if connection.vendor == "postgresql":  # the workers share the test database
            env["TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
        if window is not None:
            env["TEST_WINDOW"] = str(window)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "django", "ordered_worker", "--processes", str(processes),
             "--hostname", f"{self.name}@%h", *extra, "--", "--loglevel", os.environ.get("TEST_WORKER_LOGLEVEL", "WARNING"),
             "--without-gossip", "--without-mingle"],
            cwd=ROOT, env=env)

    @property
    def nodes(self) -> list[str]:
        host = socket.gethostname()
        return [f"{self.name}-{i}@{host}" for i in range(self.processes)]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(self.nodes)
        while waiting:
            assert self.process.poll() is None, "ordered_worker exited during start-up"
            assert time.monotonic() < deadline, f"workers {sorted(waiting)} did not start"
            # A connection of its own each time, not the pool's: the broker may have closed a pooled
            # one (a test closes every connection on RabbitMQ to hand a partition over).
            # A short timeout: a ping sent before a worker listens is lost (Redis broadcasts with
            # PUBLISH), and the reply of every worker it reached ends the wait at once.
            try:
                with self.app.connection_for_write() as connection:
                    replies = self.app.control.ping(destination=sorted(waiting), timeout=0.2,
                                                    connection=connection)
            except (OSError, OperationalError):  # the broker restarting: ask again
                time.sleep(0.5)
                continue
            for reply in replies:
                waiting -= set(reply)

    def child_pids(self) -> list[int]:
        return children(self.process.pid)

    def terminate(self) -> None:
        """Ask for a warm shutdown, once: the launcher takes a second signal as a cold shutdown."""
        if self.process.poll() is None and not self.terminating:
            self.terminating = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in self.child_pids():  # leave no worker holding a partition behind
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait()
            raise


@pytest.fixture
def shared_db(transactional_db: None) -> None:
    """A database the worker subprocesses share with the test (PostgreSQL)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        require("postgresql://127.0.0.1:5432", 5432, "PostgreSQL (shared with the workers)")
        pytest.skip("worker subprocesses cannot share an in-memory SQLite test database")


@pytest.fixture
def start_workers(app: Celery, broker: str, shared_db: None) -> Iterator[Any]:
    started: list[Workers] = []

    def start(processes: int = 2, *extra: str, ready: bool = True, window: int | None = None) -> Workers:
        workers = Workers(app, broker, processes, list(extra), window)
        started.append(workers)
        if ready:
            workers.wait_ready()
        return workers

    yield start
    for workers in started:  # all stop at once
        workers.terminate()
    for workers in started:
        began = time.monotonic()
        with contextlib.suppress(Exception):
            workers.stop()
        if time.monotonic() - began > 20:
            print(f"stopping launcher {workers.process.pid} took {time.monotonic() - began:.0f} s", flush=True)


def eventually(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll ``check`` until it returns something true (returned), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.1)


def wait_done(results: redis.Redis, run: str, total: int, timeout: float = 120.0) -> int:
    """Wait until ``total`` tasks of ``run`` recorded themselves; return how many did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = int(results.get(f"{run}:done") or 0)
        if done >= total:
            return done
        time.sleep(0.05)
    return int(results.get(f"{run}:done") or 0)


def publish_and_consume(channel: Any, queue: Queue, bodies: Iterable[Any],
                        callback: Callable[[Any, Any], Any]) -> Any:
    """Declare ``queue`` on ``channel``, publish ``bodies`` to it (JSON), and consume it with ``callback``."""
    from kombu import Consumer, Producer

    queue(channel).declare()
    producer = Producer(channel)
    for body in bodies:
        producer.publish(body, routing_key=queue.name)
    consumer = Consumer(channel, [queue], callbacks=[callback], accept=["json"])
    consumer.consume()
    return consumer


def holding_consumer(channel: Any, queues: list[Queue]) -> tuple[Any, list[Any], Callable[[], None]]:
    """A consumer that keeps what it receives unacknowledged, on a Redis channel set up as a worker's.

    Returns the consumer (call ``consume()``), the list of received messages,
    and a function that delivers what the channel fetches, for up to 1.5 s.
    """

    from kombu import Consumer

    held: list[Any] = []
    consumer = Consumer(channel, queues, accept=["json"], callbacks=[lambda body, message: held.append(message)])
    channel.basic_qos(prefetch_count=10)  # the worker's limit is its partition count

    def drain() -> None:
        for _ in range(5):
            try:
                channel.connection.client.drain_events(timeout=0.3)
            except TimeoutError:
                return

    return consumer, held, drain
