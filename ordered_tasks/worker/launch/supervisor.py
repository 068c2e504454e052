"""Starting, restarting and stopping the ordered worker processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .platform import die_with_parent

logger = logging.getLogger("ordered_tasks.worker")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to send SIGTERM to this child when the supervisor dies."""
    die_with_parent(signal.SIGTERM)


@dataclass
class Child:
    """One supervised worker process."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_delay: float = 1.0
    restart_at: float | None = None
    restarts: int = field(default=0)


class Supervisor:
    """Runs the worker processes, restarts any that dies, stops them on a signal.

    The first SIGTERM or SIGINT asks every worker for a warm shutdown (the
    running task finishes and is acknowledged); a second one asks for a cold
    shutdown (the running task is abandoned unacknowledged, so the broker
    redelivers it).
    """

    #: A worker that ran at least this long before dying restarts at once.
    stable_after = 10.0
    max_restart_delay = 30.0
    poll_interval = 0.2

    def __init__(self, children: Sequence[Child], env: Mapping[str, str]) -> None:
        self.children = list(children)
        self.env = dict(env)
        self.signals_received = 0

    def _start(self, child: Child) -> None:
        child.process = subprocess.Popen(
            child.argv, env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        child.started_at = time.monotonic()
        child.restart_at = None
        logger.info("started %s (pid %s)", child.name, child.process.pid)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals_received += 1
        cold = self.signals_received > 1
        sig = signal.SIGQUIT if cold else signal.SIGTERM
        logger.info("%s received: %s shutdown of the workers",
                    signal.Signals(signum).name, "cold" if cold else "warm")
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(sig)

    def _check(self, child: Child) -> None:
        process = child.process
        now = time.monotonic()
        if process is not None and process.poll() is not None:
            ran = now - child.started_at
            child.restart_delay = 1.0 if ran >= self.stable_after else min(
                child.restart_delay * 2, self.max_restart_delay)
            child.restart_at = now + (0.0 if ran >= self.stable_after else child.restart_delay)
            logger.warning("%s (pid %s) exited with %s after %.1fs; restarting in %.1fs",
                           child.name, process.pid, process.returncode, ran,
                           child.restart_at - now)
            child.process = None
        if child.process is None and child.restart_at is not None and now >= child.restart_at:
            child.restarts += 1
            self._start(child)

    def run(self) -> int:
        """Supervise until a signal stops the workers; return the exit status."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for child in self.children:
                self._start(child)
            while not self.signals_received:
                for child in self.children:
                    self._check(child)
                time.sleep(self.poll_interval)
            return self._wait_all()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _wait_all(self) -> int:
        status = 0
        for child in self.children:
            if child.process is None:
                continue
            while child.process.poll() is None:
                time.sleep(self.poll_interval)
            logger.info("%s (pid %s) stopped with %s", child.name, child.process.pid,
                        child.process.returncode)
            status = status or (child.process.returncode or 0)
        return status


def child_env(settings_module: str, sys_path: Sequence[str]) -> dict[str, str]:
    """Environment for the workers: same settings and import path as this process."""
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = settings_module
    extra = [os.path.abspath(p or os.curdir) for p in sys_path]
    existing = env.get("PYTHONPATH", "")
    paths = [p for p in extra if os.path.isdir(p)] + ([existing] if existing else [])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env
