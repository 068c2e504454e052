"""The Celery router that sends ordered tasks to their partition queue."""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Sequence

from celery import Celery
from kombu import Queue

from .compat import task_registry
from .conf import get_settings
from .keys import KeySpec
from .options import KEY_HEADER, check_publish_options
from .queues import queue_of_key


def key_spec_for(app: Celery | None, name: str, task: Any = None) -> KeySpec | None:
    """How to find the key of task ``name``: its own spec, else ``ROUTES``, else None."""
    if task is None and app is not None:
        task = task_registry(app).get(name)
    spec = getattr(task, "ordered_key", None)
    if isinstance(spec, KeySpec):
        return spec
    route_key = get_settings().route_key_for(name)
    if route_key is None:
        return None
    return KeySpec.for_route(route_key, name)


def route_task(name: str, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None,
               options: Mapping[str, Any], task: Any = None, **kw: Any) -> dict[str, Any] | None:
    """Celery router (callable ``task_routes`` entry) for ordered tasks.

    Returns ``{"queue": <partition queue>}`` for a locally registered ordered
    task or a name matched by ``ORDERED_TASKS["ROUTES"]``, and ``None`` for
    every other task so that the remaining routes apply.
    """
    spec = key_spec_for(None, name, task)
    if spec is None:
        return None
    conf = get_settings()
    queue = options.get("queue")
    if (KEY_HEADER in (options.get("headers") or {}) and isinstance(queue, Queue)
            and conf.partition_of_queue(queue.name) is not None):
        return None  # OrderedTask.apply_async chose the queue; the publish guard checks it.
    check_publish_options(name, options)
    return {"queue": queue_of_key(spec.canonical(args, kwargs)).queue}


class AppRouter:
    """:func:`route_task` bound to one app: a task sent by name is looked up in the app's registry.

    Celery 5.7 hands routers the registered task of a ``send_task``;
    earlier versions hand them None, and a locally registered ordered task
    sent by name would go to the default queue, unordered.
    :func:`~ordered_tasks.install` puts one first in ``task_routes``.
    """

    def __init__(self, app: Celery) -> None:
        self._app = weakref.ref(app)

    @property
    def app(self) -> Celery | None:
        """The app this router serves (None once it is gone)."""
        return self._app()

    def __call__(self, name: str, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None,
                 options: Mapping[str, Any], task: Any = None, **kw: Any) -> dict[str, Any] | None:
        app = self._app()
        if task is None and app is not None:
            task = task_registry(app).get(name)
        return route_task(name, args, kwargs, options, task=task, **kw)

    def __repr__(self) -> str:
        return f"<ordered_tasks router of {self._app()!r}>"
