"""Every private Celery and kombu name the worker relies on, in one place, checked by a test."""

from __future__ import annotations

from typing import Any

_GUARDED: dict[tuple[type, type], type] = {}


def guard_task(task: Any, mixin: type) -> None:
    """Put ``mixin`` in front of the class of a registered task (a plain task that ROUTES orders).

    Celery has no way to give a registered task another base class, and
    other modules hold the task object itself, so its class is swapped
    for a subclass, once per worker process.
    """
    cls = type(task)
    if issubclass(cls, mixin):
        return
    guarded = _GUARDED.get((cls, mixin))
    if guarded is None:
        guarded = type(f"Guarded{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
        _GUARDED[(cls, mixin)] = guarded
    task.__class__ = guarded
