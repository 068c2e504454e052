"""Broker restarts: workers reconnect and continue; nothing the broker kept is lost or reordered."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from tests.conftest import Workers, make_app, purge_all, wait_done
from tests.services import BROKERS, in_ci, require
from tests.support.workload import assert_in_order, assert_keys_never_overlap, publish_interleaved

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("shared_db")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, up: bool, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.1)
    raise AssertionError(f"port {port} did not go {'up' if up else 'down'}")


@contextlib.contextmanager
def persistent_redis() -> Iterator[tuple[int, Any]]:
    """A private Redis with append-only persistence; yields its port and a restart function."""
    if shutil.which("redis-server") is None:
        if in_ci():
            pytest.fail("redis-server is not installed (CI=true: every service is required)")
        pytest.skip("redis-server is not installed")
    port = _free_port()
    folder = tempfile.mkdtemp(prefix="ordered-redis-")
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", folder,
               "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"]

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        _wait_port(port, up=True)
        return process

    server = [start()]

    def restart() -> None:
        redis.Redis(port=port).shutdown(nosave=False)
        server[0].wait(30)
        _wait_port(port, up=False)
        server[0] = start()

    try:
        yield port, restart
    finally:
        server[0].terminate()
        server[0].wait(30)
        shutil.rmtree(folder, ignore_errors=True)


def _run_through_restart(app: Celery, broker_url: str, results: redis.Redis, restart: Any) -> None:
    run = uuid.uuid4().hex
    workers = Workers(app, broker_url, 2, [])
    try:
        workers.wait_ready()
        total = publish_interleaved(app, run, keys=40, per_key=15, seed=21, slow=0.02)
        while int(results.get(f"{run}:done") or 0) < total // 5:
            time.sleep(0.05)
        restart()
        assert wait_done(results, run, total, timeout=120) >= total
        assert_in_order(results, run, keys=40, per_key=15, redelivered=2)
        assert_keys_never_overlap(results, run)
    finally:
        with contextlib.suppress(Exception):
            workers.stop()


def _run_on(url: str, results: redis.Redis, restart: Any) -> None:
    app = make_app(url)
    purge_all(app)
    try:
        _run_through_restart(app, url, results, restart)
    finally:
        app.close()


def test_workers_continue_after_a_redis_restart(results: redis.Redis) -> None:
    with persistent_redis() as (port, restart):
        _run_on(f"redis://127.0.0.1:{port}/0", results, restart)


@pytest.mark.restarts_broker
def test_workers_continue_after_a_rabbitmq_restart(results: redis.Redis) -> None:
    url = BROKERS["rabbitmq"]
    require(url, 5672, "rabbitmq")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not available to restart RabbitMQ")

    def restart() -> None:
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
        _wait_port(5672, up=True, timeout=60)

    _run_on(url, results, restart)
