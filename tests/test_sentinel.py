"""Redis Sentinel brokers end to end: coordination Redis, the reliable fetch, the partitions page."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis
from celery import Celery

from ordered_tasks import partition_for
from ordered_tasks.brokerstats import queue_figures
from ordered_tasks.conf import get_settings
from ordered_tasks.coordination import client_for, coordination_client
from ordered_tasks.exceptions import ConfigurationError
from ordered_tasks.models import ParkedMessage
from ordered_tasks.queues import partition_queue
from tests.conftest import Workers, eventually, make_app, wait_done
from tests.services import REDIS_URL, in_ci, require

pytestmark = pytest.mark.integration
MASTER = "ordered-test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


#: The test Redis database, which the Sentinel's URLs name too.
DB = urlparse(REDIS_URL).path.strip("/") or "0"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def sentinel_url() -> Iterator[str]:
    """A Sentinel on a free port that names the test Redis as master ``ordered-test``."""
    require(REDIS_URL, 6379, "Redis")
    server = shutil.which("redis-server")
    if server is None:
        message = "redis-server is not installed, so no Sentinel can run"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    port = _free_port()
    with tempfile.TemporaryDirectory() as folder:
        conf = Path(folder) / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                        f"sentinel monitor {MASTER} 127.0.0.1 6379 1\n"
                        f"sentinel down-after-milliseconds {MASTER} 600000\n")
        process = subprocess.Popen([server, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
        try:
            eventually(lambda: _answers(port), timeout=10, what="the Sentinel to listen")
            yield f"sentinel://127.0.0.1:{port}/{DB}"
        finally:
            process.terminate()
            process.wait(10)


def test_the_master_behind_a_sentinel_url_is_the_coordination_redis(sentinel_url: str) -> None:
    key = f"sentinel-{uuid.uuid4().hex[:8]}"
    direct = redis.Redis.from_url(REDIS_URL)
    client_for(sentinel_url, {"master_name": MASTER}).set(key, "via sentinel", ex=60)
    assert direct.get(key) == b"via sentinel"
    app = Celery("sentinel-conf", set_as_current=False)
    app.conf.broker_url = sentinel_url
    with pytest.raises(ConfigurationError, match="master_name"):
        client_for(sentinel_url, {})
    app.conf.broker_transport_options = {"master_name": MASTER}
    from django.test import override_settings

    with override_settings(ORDERED_TASKS={"PARTITIONS": get_settings().partitions,
                                          "QUEUE_PREFIX": get_settings().queue_prefix}):
        client = coordination_client(app)
        assert client is not None and client.get(key) == b"via sentinel"
        figures = queue_figures(sentinel_url, get_settings().queue_prefix, get_settings().partitions,
                                {"master_name": MASTER})
        assert set(figures) == set(range(get_settings().partitions))
        assert all(f.depth is not None for f in figures.values())  # asked of Redis, not of AMQP


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.usefixtures("shared_db")
def test_ordered_workers_on_a_sentinel_broker_keep_order_and_fetch_reliably(
        sentinel_url: str, results: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_SENTINEL_MASTER", MASTER)
    monkeypatch.setenv("TEST_REDIS_URL", "")  # leases and ledger on the master found through Sentinel
    app = make_app(sentinel_url)
    app.conf.broker_transport_options = {"master_name": MASTER}
    run = uuid.uuid4().hex
    queue = partition_queue(get_settings().queue_prefix, partition_for(f"s-{run[:6]}-0")).name
    direct = redis.Redis.from_url(REDIS_URL)
    direct.lpush(queue, b"\xff a raw item kombu's BRPOP could not decode")
    workers = Workers(app, sentinel_url, 1, [])
    try:
        workers.wait_ready()
        task = app.tasks["tests.testapp.tasks.ordered_record"]
        for seq in range(1, 6):
            for n in range(6):
                task.delay(run=run, key=f"s-{run[:6]}-{n}", seq=seq)
        assert wait_done(results, run, 30, timeout=60) == 30
        for n in range(6):
            assert [int(s) for s in results.lrange(f"{run}:key:s-{run[:6]}-{n}", 0, -1)] == [1, 2, 3, 4, 5]
        row = eventually(lambda: ParkedMessage.objects.filter(headers__has_key="x-ordered-tasks-raw",
                                                              partition=partition_for(f"s-{run[:6]}-0")).first(),
                         timeout=20, what="the raw item to be parked by the reliable fetch")
        assert b"raw item" in bytes.fromhex(bytes(row.body).decode())
        assert workers.process.poll() is None
    finally:
        workers.stop()
