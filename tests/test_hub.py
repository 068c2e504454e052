"""The event-loop fix: a callback scheduled from the loop runs without waiting for a timer."""

from __future__ import annotations

import socket
import time

from kombu.asynchronous.hub import Hub

from ordered_tasks.worker.launch.hub import ReadyAwareHub, ReadyAwareHubStep, ReadyAwarePoller


def run_until(hub: Hub, done: list[float], limit: float) -> float:
    left, right = socket.socketpair()
    ran: list[str] = []

    def first() -> None:
        # A ready callback scheduling the next one, as kombu's AMQP reader does.
        hub.call_soon(lambda: done.append(time.monotonic()))

    def on_readable() -> None:
        left.recv(1)
        hub.call_soon(first)
        ran.append("read")

    hub.add_reader(left.fileno(), on_readable)
    hub.call_later(30.0, lambda: None)  # a far timer: poll would sleep until it, capped at 10 s
    right.send(b"x")
    started = time.monotonic()
    loop = hub.create_loop()
    try:
        while not done and time.monotonic() - started < limit:
            next(loop)
    finally:
        hub.remove(left.fileno())
        left.close()
        right.close()
        hub.close()
    return (done[0] if done else time.monotonic()) - started


def test_ready_callback_runs_without_waiting_for_timers() -> None:
    done: list[float] = []
    elapsed = run_until(ReadyAwareHub(), done, limit=15)
    assert done, "the callback scheduled with call_soon never ran"
    assert elapsed < 1.0


def test_poller_passes_timeout_when_nothing_is_ready() -> None:
    calls: list[float | None] = []

    class Inner:
        def poll(self, timeout: float | None) -> list[object]:
            calls.append(timeout)
            return []

    hub = Hub()
    poller = ReadyAwarePoller(Inner(), hub)
    poller.poll(2.5)
    hub.call_soon(lambda: None)
    poller.poll(2.5)
    assert calls == [2.5, 0]
    hub.close()


def test_step_converts_the_worker_hub() -> None:
    class Worker:
        hub = Hub()

    worker = Worker()
    ReadyAwareHubStep(worker).create(worker)
    assert isinstance(worker.hub, ReadyAwareHub)
    assert isinstance(worker.hub.poller, ReadyAwarePoller)
    worker.hub.close()
