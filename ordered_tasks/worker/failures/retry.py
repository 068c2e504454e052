"""In-place retries: ``retry()`` of an ordered task runs the message again in its place."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

from celery.exceptions import Ignore, Retry
from django.utils import timezone

from ...exceptions import UnsafeOptionError


class InPlaceRetry(Retry):
    """Raised by ``retry()`` of an ordered task: run this message again in its place."""

    def __init__(self, exc: BaseException | None, countdown: float,
                 args: Any = None, kwargs: Any = None) -> None:
        super().__init__(exc=exc, when=countdown)  # type: ignore[arg-type]
        self.countdown = countdown
        self.new_args = args
        self.new_kwargs = kwargs


class Parked(Ignore):
    """The message was parked behind a held key instead of running."""


def seconds_until(when: Any) -> float | None:
    """``when`` of a Celery ``Retry`` (seconds or a datetime) as seconds from now."""
    if when is None:
        return None
    if isinstance(when, datetime):
        return max(0.0, (when - timezone.now()).total_seconds())
    return max(0.0, float(when))


def retry_in_place(task: Any, request: Any, args: Any = None, kwargs: Any = None,
                   exc: BaseException | None = None, throw: bool = True, eta: datetime | None = None,
                   countdown: float | None = None, max_retries: int | None = None,
                   options: dict[str, Any] | None = None) -> Any:
    """``task.retry(...)`` of a delivered message: raise :class:`InPlaceRetry`, never republish."""
    if options or not throw:
        refused = ", ".join(sorted(options or {})) or "throw=False"
        raise UnsafeOptionError(
            f"{task.name}.retry() cannot take {refused}: an ordered task retries in "
            "place, in its own queue. Pass only exc, countdown, eta, max_retries, args or kwargs."
        )
    exc = exc or sys.exc_info()[1]
    limit = task.max_retries if max_retries is None else max_retries
    if limit is not None and (request.retries or 0) >= limit:
        if exc is not None:
            raise exc
        raise task.MaxRetriesExceededError(
            f"Can't retry {task.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}")
    delay = seconds_until(eta) if countdown is None else countdown
    if delay is None:
        delay = task.default_retry_delay
    raise InPlaceRetry(exc, float(delay), args, kwargs)
