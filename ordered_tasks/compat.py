"""Every private Celery and kombu name ordered_tasks relies on, in one list that a test checks.

Where Celery and kombu offer an extension point, ordered_tasks uses it
(task base classes, bootsteps, ``task_routes``, a kombu transport with its
Channel and QoS subclassed, the worker's consumer class). What remains is
listed in :data:`PRIVATE_NAMES`: names the producer reads through the
functions below, and hooks of kombu's Redis channel, hub and Celery's
request that the worker's subclasses override or read. ``tests/test_compat.py``
fails when an upgrade removes one or changes its parameters. Every
``__class__`` swap and per-instance method of a Celery or kombu object is
made here too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable, NamedTuple

from celery import Celery, _state


class Private(NamedTuple):
    """One private name: where it lives, and what ordered_tasks expects of it."""

    owner: str
    name: str
    #: The parameters a method must accept (after ``self``); None for an attribute.
    parameters: tuple[str, ...] | None = None
    #: The first release of the owner's package that has the name, if later than the oldest supported.
    since: tuple[int, int] | None = None


PRIVATE_NAMES: tuple[Private, ...] = (
    # The producer: registering tasks of @ordered_task, installing into every app.
    Private("celery._state", "_get_active_apps", ()),
    Private("celery._state", "connect_on_app_finalize", ("callback",)),
    Private("celery._state", "get_current_app", ()),
    Private("celery._state", "_tls"),
    Private("celery.app.base:Celery", "_task_from_fun", ("fun", "name", "base", "bind")),
    Private("celery.app.base:Celery", "_finalize_mutex"),
    Private("celery.app.base:Celery", "_tasks"),
    # Publishing on Redis with one client object (ordered_tasks.redisclient).
    Private("kombu.transport.redis:Channel", "_create_client", ("asynchronous",)),
    # The reliable fetch (ordered_tasks.worker.transport.fetch).
    Private("kombu.transport.redis:Channel", "_brpop_start", ("timeout",)),
    Private("kombu.transport.redis:Channel", "_brpop_read", ()),
    Private("kombu.transport.redis:Channel", "_queue_cycle"),
    Private("kombu.transport.redis:Channel", "_q_for_pri", ("queue", "pri")),
    Private("kombu.transport.redis:Channel", "_in_poll"),
    # Putting a message back before its key's messages set aside.
    Private("kombu.transport.redis:Channel", "_do_restore_message",
            ("payload", "exchange", "routing_key", "pipe", "leftmost")),
    Private("kombu.transport.virtual.base:Channel", "_lookup", ("exchange", "routing_key", "default")),
    Private("kombu.transport.virtual.base:Channel", "_get_message_priority", ("message", "reverse")),
    Private("kombu.transport.redis:Channel", "_brpop_sent_at", since=(5, 7)),  # kombu's stuck-fetch watch
    # The batched fetch reads its reply as kombu's _brpop_read does, for several messages.
    Private("kombu.transport.redis:Channel", "_flush_brpop_reauth", (), since=(5, 7)),
    Private("kombu.transport.virtual.base:Transport", "_deliver", ("message", "queue")),
    Private("kombu.transport.virtual.base:Transport", "_callbacks"),
    Private("kombu.transport.virtual.base:QoS", "_delivered"),
    Private("kombu.transport.virtual.base:QoS", "_dirty"),
    # The event loop that does not sleep past ready callbacks (ordered_tasks.worker.launch.hub).
    Private("kombu.asynchronous.hub:Hub", "_create_poller", ()),
    Private("kombu.asynchronous.hub:Hub", "_poller"),
    Private("kombu.asynchronous.hub:Hub", "_ready"),
    # RabbitMQ: frames read ahead, acknowledgements written together (ordered_tasks.worker.transport.frames).
    # Public names, but not documented: py-amqp's connection makes its transport with this method,
    # and the transport's frames go through these two.
    Private("amqp.connection:Connection", "Transport",
            ("host", "connect_timeout", "ssl", "read_timeout", "write_timeout", "socket_settings")),
    Private("amqp.transport:TCPTransport", "read_frame", ("unpack",)),
    Private("amqp.transport:TCPTransport", "write", ("s",)),
    Private("kombu.transport.pyamqp:Transport", "on_readable", ("connection", "loop")),
    # The worker request that parks what Celery would drop (ordered_tasks.worker.failures.request).
    Private("celery.worker.request:Request", "_announce_revoked",
            ("reason", "terminated", "signum", "expired")),
    Private("celery.worker.request:Request", "_request_dict"),
    Private("celery.worker.request:Request", "_message"),
    Private("celery.worker.request:Request", "_content_type"),
    Private("celery.worker.request:Request", "_content_encoding"),
    Private("celery.worker.request:Request", "_context"),  # the PARKED state's request, for the backend
    # RabbitMQ: a lost connection ends the partitions' tenures at once (ordered_tasks.worker.consumer).
    # Public, not documented: Celery's consumer calls it when the broker connection is lost.
    Private("celery.worker.consumer.consumer:Consumer", "on_connection_error_after_connected", ("exc",)),
)


def on_app_finalize(callback: Callable[[Celery], Any]) -> None:
    """Call ``callback`` with every Celery app finalized from now on (as ``@shared_task`` does)."""
    _state.connect_on_app_finalize(callback)


def current_app() -> Celery:
    """The current Celery app (the default app when none was made current)."""
    app: Celery = _state.get_current_app()
    return app


def active_apps() -> list[Celery]:
    """Every Celery app of this process (Celery keeps them in a private weak set)."""
    return list(_state._get_active_apps())  # type: ignore[attr-defined]


def current_or_default_app() -> Celery | None:
    """The app made current in this thread, else the default app, without creating one."""
    state: Any = _state
    app: Celery | None = state._tls.current_app or state.default_app
    return app


def task_registry(app: Celery) -> Mapping[str, Any]:
    """The app's task registry as it is, without finalizing the app (``app.tasks`` would)."""
    registry: Mapping[str, Any] = app._tasks  # type: ignore[attr-defined]
    return registry


def register_task(app: Celery, fun: Callable[..., Any], **options: Any) -> Any:
    """Register ``fun`` as a task of ``app`` as ``@app.task`` does, also on a finalized app."""
    return app._task_from_fun(fun, **options)


def is_finalized(app: Celery) -> bool:
    """Whether ``app`` is finalized (its task registry complete)."""
    return bool(app.finalized)  # type: ignore[attr-defined]


def finalize_lock(app: Celery) -> threading.RLock:
    """The lock Celery holds while it finalizes ``app``."""
    lock: threading.RLock = app._finalize_mutex  # type: ignore[attr-defined]
    return lock


@contextmanager
def channel_client(channel: Any, client: Any) -> Iterator[None]:
    """While inside, kombu's Redis ``channel`` uses ``client`` for every command outside the event loop."""
    create = channel._create_client

    def create_client(asynchronous: bool = False) -> Any:
        return create(asynchronous=True) if asynchronous else client

    channel._create_client = create_client
    try:
        yield
    finally:
        del channel._create_client


def new_client(channel: Any) -> Any:
    """A new ``redis.Redis`` object of kombu's Redis ``channel``, as kombu makes them."""
    return type(channel)._create_client(channel)

_GUARDED: dict[tuple[type, type], type] = {}


def guard_task(task: Any, mixin: type) -> None:
    """Put ``mixin`` in front of the class of a registered task (a plain task that ROUTES orders).

    Celery has no way to give a registered task another base class, and
    other modules hold the task object itself, so its class is swapped
    for a subclass, once per worker process.

    The task's own options among ``mixin.task_options`` (set by its
    decorator, ``@shared_task(failure_policy="continue")``, or by its base
    class) are kept: the mixin's defaults only fill in what it left unset.
    """
    cls = type(task)
    if issubclass(cls, mixin):
        return
    guarded = _GUARDED.get((cls, mixin))
    if guarded is None:
        own = _own_options(cls, getattr(mixin, "task_options", ()))
        guarded = type(f"Guarded{cls.__name__}", (mixin, cls), {"__module__": cls.__module__, **own})
        _GUARDED[(cls, mixin)] = guarded
    task.__class__ = guarded


def unguard_task(task: Any, cls: type) -> None:
    """Give a task that :func:`guard_task` guarded its class ``cls`` back (the testing helper)."""
    if type(task) is not cls and issubclass(type(task), cls):
        task.__class__ = cls


def _own_options(cls: type, names: Iterator[str] | tuple[str, ...]) -> dict[str, Any]:
    """The values of ``names`` that ``cls`` or a base class below Celery's ``Task`` sets."""
    from celery.app.task import Task

    own: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass is Task:
            break
        for name in names:
            if name in vars(klass) and name not in own:
                own[name] = vars(klass)[name]
    return own


def make_hub_ready_aware(hub: Any, hub_class: type) -> None:
    """Give the worker's kombu hub the class ``hub_class`` (a subclass of its own).

    Celery's ``Hub`` step makes the hub itself; a hub it should make
    instead can be named by no setting.
    """
    if not isinstance(hub, hub_class):
        if not issubclass(hub_class, type(hub)):
            raise TypeError(f"{hub_class.__name__} does not extend {type(hub).__name__}")
        hub.__class__ = hub_class
