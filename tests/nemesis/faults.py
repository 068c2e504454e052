"""Seeded nemesis: kills and freezes worker processes, adds a standby, optionally breaks services."""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from tests.conftest import children
from tests.nemesis.history import Fault

#: The Redis lease of a partition (a freeze longer than this loses it).
LEASE_SECONDS = 6.0


@dataclass
class NemesisConfig:
    """Which faults the nemesis may inject; every operation is a switch."""

    kill_pool: bool = True
    kill_worker: bool = True
    #: SIGSTOP a worker (and its pool) for less than the lease, then SIGCONT.
    stop_worker: bool = True
    #: SIGSTOP a worker for longer than the Redis lease (6 s), then SIGCONT.
    stop_past_lease: bool = True
    #: A second launcher for the same partitions, started during the run.
    standby: bool = True
    #: Redis forgets its Lua scripts (``SCRIPT FLUSH``), as after a restart: the fetch and the
    #: leases must send them again without losing or skipping a message.
    script_flush: bool = True
    #: Disturb services that others on the machine share: off unless explicitly allowed.
    broker_restart: bool = False
    db_outage: bool = False
    interval: tuple[float, float] = (6.0, 14.0)

    @classmethod
    def switches(cls) -> list[str]:
        """The names of the boolean switches."""
        return [f.name for f in fields(cls) if f.type in ("bool", bool)]

    def kinds(self) -> list[str]:
        return [name for name in self.switches() if getattr(self, name) and name != "standby"]


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


class Nemesis:
    """Injects faults from a thread until stopped; every fault is undone before ``stop`` returns."""

    def __init__(self, seed: int, config: NemesisConfig, launchers: list[Any],
                 start_standby: Callable[[], Any], disruptive: bool = False, slots: int = 1) -> None:
        self.rng = random.Random(seed)
        #: Tasks a worker process runs at once (its pool's concurrency).
        self.slots = slots
        self.config = config
        self.launchers = launchers
        self.start_standby = start_standby
        self.disruptive = disruptive
        self.faults: list[Fault] = []
        self.stopped: set[int] = set()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nemesis", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> list[Fault]:
        """Stop injecting, undo what is still in effect, return the log."""
        self._halt.set()
        self._thread.join(timeout)
        self.heal()
        assert not self._thread.is_alive(), "the nemesis thread did not stop"
        return self.faults

    def heal(self) -> None:
        _signal(sorted(self.stopped), signal.SIGCONT)
        self.stopped.clear()

    def _loop(self) -> None:
        kinds = self.config.kinds()
        standby_at = time.monotonic() + self.rng.uniform(5.0, 30.0) if self.config.standby else None
        try:
            while not self._halt.wait(self.rng.uniform(*self.config.interval)):
                if standby_at is not None and time.monotonic() >= standby_at:
                    now = time.time()
                    self.launchers.append(self.start_standby())
                    self.faults.append(Fault("standby", now, now, "launcher"))
                    standby_at = None
                elif kinds:
                    self._inject(self.rng.choice(kinds))
        except BaseException as exc:  # reported by the runner
            self.error = exc
        finally:
            self.heal()

    def _workers(self) -> list[int]:
        return sorted(pid for launcher in self.launchers if launcher.process.poll() is None
                      for pid in children(launcher.process.pid))

    def _inject(self, kind: str) -> None:
        workers = self._workers()
        pick = self.rng.random()
        if not workers and kind in ("kill_pool", "kill_worker", "stop_worker", "stop_past_lease"):
            return
        if kind == "kill_pool":
            pool = sorted(p for w in workers for p in children(w))
            if pool:
                victim = pool[int(pick * len(pool))]
                _signal([victim], signal.SIGKILL)
                self._log(kind, time.time(), time.time(), f"pool process {victim}")
        elif kind == "kill_worker":
            victim = workers[int(pick * len(workers))]
            _signal([victim], signal.SIGKILL)
            self._log(kind, time.time(), time.time(), f"worker {victim}", self.slots)
        elif kind in ("stop_worker", "stop_past_lease"):
            victim = workers[int(pick * len(workers))]
            with_pool = self.rng.random() < 0.5
            pids = [victim, *children(victim)] if with_pool else [victim]
            seconds = (self.rng.uniform(1.0, 0.6 * LEASE_SECONDS) if kind == "stop_worker"
                       else self.rng.uniform(LEASE_SECONDS + 1.0, LEASE_SECONDS + 5.0))
            start = time.time()
            self.stopped.update(pids)
            _signal(pids, signal.SIGSTOP)
            self._halt.wait(seconds)
            _signal(pids, signal.SIGCONT)
            self.stopped.difference_update(pids)
            self._log(kind, start, time.time(), f"pids {pids} for {seconds:.1f} s", self.slots)
        elif kind == "script_flush":
            import redis

            url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/14") or "redis://127.0.0.1:6379/14"
            redis.Redis.from_url(url).script_flush()
            self._log(kind, time.time(), time.time(), url)
        elif kind in ("broker_restart", "db_outage"):
            self._disrupt(kind)

    def _log(self, kind: str, start: float, end: float, target: str, slots: int = 1) -> None:
        self.faults.append(Fault(kind, start, end, target, slots))

    def _disrupt(self, kind: str) -> None:
        """Restart the broker or close the test database for a few seconds (only when allowed)."""
        assert self.disruptive, f"{kind} disturbs shared services; enable it with --disruptive"
        start = time.time()
        if kind == "broker_restart":
            command = os.environ.get("NEMESIS_BROKER_RESTART_CMD", "")
            assert command, "set NEMESIS_BROKER_RESTART_CMD to the command that restarts the broker"
            subprocess.run(shlex.split(command), check=True, timeout=180)
        else:
            with database_closed(self.rng.uniform(2.0, 8.0)):
                pass
        self._log(kind, start, time.time(), kind)


@contextlib.contextmanager
def database_closed(seconds: float) -> Any:
    """Refuse connections to the test database and end the open ones, for ``seconds``."""
    import psycopg
    from django.db import connection

    name = connection.settings_dict["NAME"]
    params = {k: v for k, v in {"host": connection.settings_dict["HOST"],
                                "user": connection.settings_dict["USER"],
                                "port": connection.settings_dict["PORT"]}.items() if v}
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                          (name,))
            time.sleep(seconds)
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
