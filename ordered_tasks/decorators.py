"""The ``@ordered_task(key=...)`` decorator, Celery's ``@shared_task`` with a key."""

from __future__ import annotations

import weakref
from typing import Any, Callable

from celery import Celery, Task
from celery.local import Proxy

from .compat import active_apps, current_app, finalize_lock, is_finalized, on_app_finalize, register_task
from .keys import KeySource, KeySpec
from .options import check_task_options
from .task import OrderedTaskMixin

_ORDERED_BASES: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def ordered_base(base: type[Task[Any, Any]]) -> type[Task[Any, Any]]:
    """The ordered variant of a Task class (cached, so each base gets one)."""
    if issubclass(base, OrderedTaskMixin):
        return base
    cls = _ORDERED_BASES.get(base)
    if cls is None:
        cls = type(f"Ordered{base.__name__}", (OrderedTaskMixin, base), {
            "__module__": __name__, "abstract": True})
        _ORDERED_BASES[base] = cls
    return cls


def ordered_task(*, key: KeySource, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """Declare a task whose calls run strictly in publish order per ``key``.

    ``key`` names the task parameter holding the ordering key (passed by
    position or keyword), or is a callable receiving the task's ``*args`` and
    ``**kwargs`` and returning it. Other options are those of
    :func:`celery.shared_task`, minus the ones that would break ordering.
    """

    def decorate(fun: Callable[..., Any]) -> Any:
        label = f"{fun.__module__}.{fun.__qualname__}"
        check_task_options(label, options)
        spec = KeySpec.for_function(key, fun, bind=bool(options.get("bind")))
        name = options.get("name")

        def register(app: Celery) -> Task[Any, Any]:
            base = ordered_base(options.get("base") or app.Task)
            task: Task[Any, Any] = register_task(app, fun, **{**options, "base": base, "ordered_key": spec})
            return task

        on_app_finalize(register)
        for app in active_apps():
            if is_finalized(app):
                with finalize_lock(app):
                    register(app)

        def current_task() -> Task[Any, Any]:
            app = current_app()
            return app.tasks[name or app.gen_task_name(fun.__name__, fun.__module__)]

        return Proxy(current_task)

    return decorate
