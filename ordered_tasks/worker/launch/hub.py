"""Event-loop fix: never sleep in poll while callbacks are ready (kombu #1587).

kombu's Hub computes its poll timeout from timers only. A callback that
schedules another with ``call_soon`` from the loop thread (as the AMQP
transport does while reading a delivery) leaves it waiting until the next
timer fires, up to 10 s. A serial consumer then stalls between tasks, because
the broker waits for the pending ``basic.ack`` before it delivers more.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from kombu.asynchronous.hub import Hub

from ...compat import make_hub_ready_aware


class ReadyAwarePoller:
    """Wraps a kombu poller: polls without waiting while the hub has ready callbacks."""

    def __init__(self, poller: Any, hub: Any) -> None:
        self._poller = poller
        self._hub = hub

    def poll(self, timeout: float | None) -> Any:
        """Poll, with timeout 0 when callbacks are already waiting to run."""
        return self._poller.poll(0 if self._hub._ready else timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)


class ReadyAwareHub(Hub):
    """A kombu Hub whose poller never sleeps past ready callbacks."""

    def _create_poller(self) -> None:
        super()._create_poller()  # type: ignore[misc]
        hub: Any = self
        hub._poller = ReadyAwarePoller(hub._poller, hub)


class ReadyAwareHubStep(bootsteps.Step):
    """Worker bootstep that turns the worker's hub into a ReadyAwareHub."""

    requires = ("celery.worker.components:Hub",)
    label = "ordered_tasks hub"

    def create(self, parent: Any) -> None:
        """Swap the class of the hub the Hub step made, and wrap its poller."""
        hub = getattr(parent, "hub", None)
        if not isinstance(hub, Hub):
            return  # no event loop in this worker, nothing to fix
        make_hub_ready_aware(hub, ReadyAwareHub)
        raw: Any = hub
        if raw._poller is not None and not isinstance(raw._poller, ReadyAwarePoller):
            raw._poller = ReadyAwarePoller(raw._poller, raw)
