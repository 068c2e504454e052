"""Installing the router and the publish guard into Celery apps."""

from __future__ import annotations

from typing import Any

from celery import Celery

from .compat import active_apps, on_app_finalize
from .publish import PublishGuard
from .routing import AppRouter, route_task

ROUTER_PATH = "ordered_tasks.routing.route_task"
#: The worker start-up step, named so that a process that only publishes never loads the worker.
REFUSE_UNSAFE_CONSUMERS = "ordered_tasks.worker.launch.startup:RefuseUnsafeConsumers"


def _routes_of(app: Celery) -> tuple[Any, ...]:
    routes = app.conf.task_routes
    if routes is None:
        return ()
    if isinstance(routes, (list, tuple)):
        return tuple(routes)
    return (routes,)


def install(app: Celery) -> Celery:
    """Make ``app`` route ordered tasks to partition queues (idempotent).

    Puts :func:`~ordered_tasks.routing.route_task`, bound to ``app``
    (:class:`~ordered_tasks.routing.AppRouter`), first in ``task_routes``
    (in place of the function or its dotted path if you listed it), guards
    ``send_task_message``, and adds a worker start-up check that
    refuses to consume partition queues outside ``ordered_worker``. ordered_tasks calls this for every
    Celery app when Django loads the app registry; call it yourself for a
    Celery app created later.
    """
    routes = _routes_of(app)
    if not (routes and isinstance(routes[0], AppRouter) and routes[0].app is app):
        ours = (route_task, ROUTER_PATH)
        others = tuple(r for r in routes if not (r in ours or isinstance(r, AppRouter)))
        app.conf.task_routes = (AppRouter(app), *others)
        amqp = app.amqp
        amqp.flush_routes()
        amqp.__dict__.pop("router", None)
    app.steps["worker"].add(REFUSE_UNSAFE_CONSUMERS)
    amqp = app.amqp
    if not isinstance(amqp.send_task_message, PublishGuard):
        amqp.send_task_message = PublishGuard(app, amqp.send_task_message)  # type: ignore[misc]
    return app


def install_everywhere() -> None:
    """Install into every Celery app that exists now or is finalized later."""
    on_app_finalize(install)
    for app in active_apps():
        install(app)
