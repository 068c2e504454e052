"""Running ordered tasks in tests without a broker, with the worker's own ordering and failure handling."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from celery import Celery, states
from kombu.serialization import dumps, loads, prepare_accept_content

from .compat import guard_task, unguard_task
from .conf import get_settings
from .exceptions import RunnerError
from .options import CONTROL_TASK, KEY_HEADER
from .routing import key_spec_for
from .states import ControlAction, KeyStatus
from .task import GuardedTaskMixin

if TYPE_CHECKING:
    from .models import ControlRequest

__all__ = ["CapturedMessage", "Execution", "OrderedTasksRunner", "RunnerError"]

logger = logging.getLogger(__name__)

#: Messages one :meth:`OrderedTasksRunner.run` delivers at most before it gives up.
DEFAULT_LIMIT = 1000
#: The node name the runner's tasks see as their worker's.
HOSTNAME = "ordered_tasks_runner@localhost"
#: True while an ordered task (or a control message) is being published: eager mode does not apply.
_ORDERED_PUBLISH: ContextVar[bool] = ContextVar("ordered_tasks_ordered_publish", default=False)
#: The runner that is active in this process, if any.
_ACTIVE: list[OrderedTasksRunner] = []


@dataclass
class CapturedMessage:
    """A message bound for a partition queue, held by the runner instead of a broker."""

    #: The task's registered name.
    task_name: str
    #: The task id (as in ``AsyncResult.id``).
    task_id: str
    #: The canonical ordering key (``None`` only for a message no key could be read from).
    key: str | None
    #: The partition whose queue the message was published to.
    partition: int
    #: The name of that queue.
    queue: str
    #: The message's headers, as a worker receives them.
    headers: dict[str, Any]
    #: The serialized body, as a worker receives it.
    body: bytes
    #: The body's content type (``application/json`` unless the task names another serializer).
    content_type: str
    #: The body's content encoding.
    content_encoding: str
    #: The message's properties (``correlation_id``, ``reply_to`` ...).
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def eta(self) -> datetime | None:
        """When the message is due (only retry wake-ups, control messages, carry one)."""
        eta = self.headers.get("eta")
        return datetime.fromisoformat(eta) if isinstance(eta, str) else None

    def decoded(self) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
        """The task's positional arguments, keyword arguments and canvas (``chain``, ``callbacks`` ...)."""
        args, kwargs, embed = loads(self.body, self.content_type, self.content_encoding, accept=None)
        return list(args), dict(kwargs), dict(embed or {})

    @property
    def args(self) -> list[Any]:
        """The task's positional arguments, as the worker decodes them."""
        return self.decoded()[0]

    @property
    def kwargs(self) -> dict[str, Any]:
        """The task's keyword arguments, as the worker decodes them."""
        return self.decoded()[1]

    @property
    def is_control(self) -> bool:
        """Whether this is a replay, skip or retry wake-up rather than a task of yours."""
        return self.task_name == CONTROL_TASK


@dataclass(frozen=True)
class Execution:
    """One run of an ordered task by the runner, and how it ended."""

    #: The task's registered name.
    task_name: str
    #: The task id (as in ``AsyncResult.id``).
    task_id: str
    #: The canonical ordering key.
    key: str | None
    #: The task's positional arguments, as it got them.
    args: tuple[Any, ...]
    #: The task's keyword arguments, as it got them.
    kwargs: dict[str, Any]
    #: ``"succeeded"``, ``"failed"``, ``"retrying"`` (an in-place retry was scheduled),
    #: ``"parked"`` (not run: its key was held, so it waits in the database) or
    #: ``"ignored"`` (the task raised Celery's ``Ignore``).
    outcome: str
    #: What the task raised (failed or retrying), else None.
    exception: BaseException | None = None
    #: Seconds the in-place retry asked to wait (``"retrying"`` only); the runner does not wait them.
    retry_in: float | None = None


def _celery_version() -> tuple[int, ...]:
    import celery

    return tuple(int(part) for part in celery.__version__.split(".")[:2] if part.isdigit())


class _EagerExceptOrdered:
    """``task_always_eager`` while a runner is active in an eager app: true, except for ordered publishes."""

    def __bool__(self) -> bool:
        return not _ORDERED_PUBLISH.get()

    def __repr__(self) -> str:
        return "True (ordered tasks excepted: an OrderedTasksRunner is active)"


def _apply_async_not_eager(task: Any, *args: Any, **kwargs: Any) -> Any:
    """``apply_async`` of a guarded task while a runner is active: never eager, so the runner gets it."""
    token = _ORDERED_PUBLISH.set(True)
    try:
        return super(GuardedTaskMixin, task).apply_async(*args, **kwargs)
    finally:
        _ORDERED_PUBLISH.reset(token)


class _CapturingProducer:
    """Stands in for the producer of one publish: keeps messages for partition queues, sends the rest."""

    #: No channel: the publish guard must not open a broker connection for a captured message.
    channel = None

    def __init__(self, runner: OrderedTasksRunner, real: Any) -> None:
        self._runner = runner
        self._real = real

    @property
    def connection(self) -> Any:
        return self._real.connection

    @property
    def serializer(self) -> Any:
        return getattr(self._real, "serializer", None)

    def revive(self, channel: Any) -> Any:
        return self._real.revive(channel)

    def publish(self, body: Any, routing_key: str | None = None, serializer: str | None = None,
                headers: dict[str, Any] | None = None, **options: Any) -> Any:
        if isinstance(routing_key, str):
            partition = get_settings().partition_of_queue(routing_key)
            if partition is not None:
                self._runner._capture(body, routing_key, partition, serializer, dict(headers or {}), options)
                return None
        return self._real.publish(body, routing_key=routing_key, serializer=serializer, headers=headers,
                                  **options)


class OrderedTasksRunner:
    """Capture the ordered tasks a test publishes, and run them as an ordered worker would.

    While the runner is active (``with OrderedTasksRunner() as runner:``, or
    the ``ordered_tasks_runner`` fixture), every message bound for a
    partition queue stays in the runner instead of going to the broker:
    ``delay``, ``apply_async``, ``send_task`` of a task named in
    ``ORDERED_TASKS["ROUTES"]``, the later steps of a chain, and the control
    messages of replays, skips and in-place retries. Other messages go where
    they would have gone. :meth:`run` runs the captured messages in publish
    order through the ordered worker's own code: a failure blocks its key and
    parks its later messages in the database, retries happen in place,
    replays and skips run the parked messages.

    ``app`` is the Celery app whose publishes are captured (default: the
    one :func:`~ordered_tasks.replay` uses, ``ORDERED_TASKS["CELERY_APP"]``
    or the current app). ``using`` is the database alias of the on-commit
    callbacks that :meth:`replay` and :meth:`skip` run.
    """

    def __init__(self, app: Celery | None = None, *, using: str = "default") -> None:
        self._app = app
        self.using = using
        #: Every execution of an ordered task by this runner, in order.
        self.history: list[Execution] = []
        self._queue: list[CapturedMessage] = []
        self._active = False
        self._running = False
        self._undo: list[Any] = []

    @property
    def app(self) -> Celery:
        """The Celery app whose publishes the runner captures."""
        if self._app is None:
            from .celery_app import find_celery_app

            self._app = find_celery_app(None)
        return self._app

    @property
    def pending(self) -> list[CapturedMessage]:
        """The captured messages that have not run yet, in the order :meth:`run` will take them."""
        return list(self._queue)

    # Starting and stopping ---------------------------------------------------------------------

    def __enter__(self) -> OrderedTasksRunner:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> OrderedTasksRunner:
        """Start capturing (what ``with`` does); returns the runner."""
        if _celery_version() < (5, 7):
            raise RunnerError("OrderedTasksRunner needs Celery 5.7 or later (it captures publishes the "
                              "way those releases send them); upgrade Celery to use it.")
        if self._active:
            raise RunnerError("This OrderedTasksRunner is already active: start it once.")
        if _ACTIVE:
            raise RunnerError("Another OrderedTasksRunner is active in this process. Use that one (the "
                              "ordered_tasks_runner fixture is one), or stop it first.")
        try:
            self._install(self.app)
        except BaseException:
            self._undo_all()
            raise
        self._active = True
        _ACTIVE.append(self)
        return self

    def _install(self, app: Celery) -> None:
        """Stand in for the broker and the worker; each change is undone by :meth:`stop`."""
        from celery.signals import task_postrun

        from .worker.failures.book import BOOK

        app.finalize(auto=True)
        classes = {name: type(task) for name, task in app.tasks.items()}
        for name, task in app.tasks.items():  # as a worker does when it starts
            if key_spec_for(app, name, task) is not None:
                guard_task(task, GuardedTaskMixin)
        self._undo.append(lambda: self._restore_classes(classes))
        amqp = app.amqp
        send = amqp.send_task_message

        def send_task_message(producer: Any, *args: Any, **kwargs: Any) -> Any:
            return send(_CapturingProducer(self, producer), *args, **kwargs)

        amqp.send_task_message = send_task_message  # type: ignore[misc]
        self._undo.append(lambda: setattr(amqp, "send_task_message", send))
        self._disable_ledger(app)
        if app.conf.task_always_eager:
            self._except_ordered_from_eager(app)
        task_postrun.connect(self._on_postrun, weak=False, dispatch_uid=f"ordered_tasks_runner_{id(self)}")
        self._undo.append(lambda: task_postrun.disconnect(dispatch_uid=f"ordered_tasks_runner_{id(self)}"))
        BOOK.forget()
        self._undo.append(BOOK.forget)

    def stop(self) -> None:
        """Stop capturing and put everything back; messages still pending are dropped."""
        if not self._active:
            return
        self._active = False
        _ACTIVE.remove(self)
        self._undo_all()
        self._queue.clear()

    def _undo_all(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _restore_classes(self, classes: Mapping[str, type]) -> None:
        for name, task in self.app.tasks.items():
            cls = classes.get(name)
            if cls is not None:
                unguard_task(task, cls)

    def _disable_ledger(self, app: Celery) -> None:
        """No completion ledger: the runner never redelivers, and a test needs no Redis."""
        from .worker.redelivery import ledger

        self._undo.append(ledger.turn_off(app))

    def _except_ordered_from_eager(self, app: Celery) -> None:
        """Eager mode stays on for other tasks; ordered tasks are published, so the runner gets them."""
        changes: Any = app.conf.changes
        had, before = "task_always_eager" in changes, changes.get("task_always_eager")
        app.conf.task_always_eager = _EagerExceptOrdered()
        GuardedTaskMixin.apply_async = _apply_async_not_eager  # type: ignore[attr-defined]

        def restore() -> None:
            del GuardedTaskMixin.apply_async  # type: ignore[attr-defined]
            if had:
                app.conf.task_always_eager = before
            else:
                changes.pop("task_always_eager", None)

        self._undo.append(restore)

    # Capturing ---------------------------------------------------------------------------------

    def _capture(self, body: Any, queue: str, partition: int, serializer: str | None,
                 headers: dict[str, Any], options: dict[str, Any]) -> None:
        """Keep one message, serialized as the broker would get it (unserializable arguments fail now)."""
        content_type, content_encoding, data = dumps(body, serializer=serializer)
        raw = data.encode(content_encoding or "utf-8") if isinstance(data, str) else bytes(data)
        properties = {name: value for name, value in options.items()
                      if name in ("correlation_id", "reply_to", "priority")}
        key = headers.get(KEY_HEADER)
        self._queue.append(CapturedMessage(
            task_name=str(headers.get("task") or ""), task_id=str(headers.get("id") or ""),
            key=None if key is None else str(key), partition=partition, queue=queue, headers=headers,
            body=raw, content_type=content_type, content_encoding=content_encoding, properties=properties))

    # Running -----------------------------------------------------------------------------------

    def run(self, *, fast_forward: bool = True, limit: int = DEFAULT_LIMIT) -> list[Execution]:
        """Run the captured messages until none is left; return the executions of this call.

        Messages run one at a time, in publish order; those published
        meanwhile (by the tasks, by a chain, by a retry) join the end. An
        in-place retry waits for its wake-up, which is due later: once
        nothing else is ready, the earliest wake-up runs at once, as if its
        delay had passed. With ``fast_forward=False``, ``run()`` returns
        then instead, and the retrying keys stay retrying until the next
        ``run()``. Raises :class:`~ordered_tasks.exceptions.RunnerError`
        after ``limit`` messages (a task that publishes itself forever).
        """
        if not self._active:
            raise RunnerError("The OrderedTasksRunner is not active: use it as a context manager "
                              "(with OrderedTasksRunner() as runner: ...) or call start() first.")
        if self._running:
            raise RunnerError("OrderedTasksRunner.run() was called from a task the runner is running. "
                              "Call it from the test only.")
        from .worker.failures.book import BOOK

        BOOK.forget()  # the test may have changed key states: read them again, as a new worker does
        first = len(self.history)
        self._running = True
        try:
            delivered = 0
            while self._queue:
                index = self._next_index(fast_forward)
                if index is None:
                    break
                if delivered >= limit:
                    raise RunnerError(
                        f"OrderedTasksRunner.run() delivered {limit} messages and {len(self._queue)} are "
                        "still waiting: a task probably publishes (or retries) itself without end. "
                        "Look at runner.pending, or pass a larger limit.")
                self._deliver(self._queue.pop(index))
                delivered += 1
        finally:
            self._running = False
        return self.history[first:]

    def _next_index(self, fast_forward: bool) -> int | None:
        """The first message that is due; else the earliest wake-up, whose wait the runner skips."""
        from django.utils import timezone

        now = timezone.now()
        waiting: list[tuple[datetime, int]] = []
        for index, message in enumerate(self._queue):
            eta = message.eta
            if eta is None or eta <= now:
                return index
            waiting.append((eta, index))
        if not fast_forward:
            return None
        eta, index = min(waiting)
        self._skip_wait(self._queue[index], now)
        return index

    def _skip_wait(self, message: CapturedMessage, now: datetime) -> None:
        """Make the in-place retry of a wake-up due now, as if its delay had passed."""
        from .models import AccountState, ParkedMessage

        _, kwargs, _ = message.decoded()
        due = kwargs.get("due")
        if kwargs.get("action") != ControlAction.WAKE.value or not isinstance(due, str):
            return
        key = str(kwargs.get("key"))
        moved = AccountState.objects.filter(key=key, status=KeyStatus.RETRYING, retry_at__gt=now,
                                            retry_at__lte=datetime.fromisoformat(due)).update(retry_at=now)
        if moved:
            ParkedMessage.objects.filter(key=key, state=ParkedMessage.State.PARKED,
                                         reason=ParkedMessage.Reason.RETRYING).update(due_at=now)

    def _deliver(self, message: CapturedMessage) -> None:
        """Run one message as the consumer of its partition does."""
        from celery.app.trace import trace_task

        from .models import ParkedMessage
        from .worker.delivery import CONTENT_ENTRY

        app = self.app
        task = app.tasks.get(message.task_name)
        if task is None:
            self._park(message, ParkedMessage.Reason.UNKNOWN_TASK,
                       f"No task named {message.task_name!r} is registered.")
            return
        try:
            args, kwargs, embed = loads(message.body, message.content_type, message.content_encoding,
                                        accept=prepare_accept_content(app.conf.accept_content))
        except Exception as exc:
            self._park(message, ParkedMessage.Reason.UNDECODABLE, repr(exc))
            return
        request: dict[str, Any] = {
            **message.headers, **(embed or {}), "id": message.task_id, "args": args, "kwargs": kwargs,
            "is_eager": False, "hostname": HOSTNAME,
            "delivery_info": {"exchange": "", "routing_key": message.queue,
                              "priority": message.properties.get("priority"), "redelivered": False},
            "reply_to": message.properties.get("reply_to"),
            "correlation_id": message.properties.get("correlation_id", message.task_id),
            CONTENT_ENTRY: [message.content_type, message.content_encoding],
        }
        _, info, _, _ = trace_task(task, message.task_id, args, kwargs, request, app=app, hostname=HOSTNAME)
        if info is not None and info.state == states.REJECTED:
            raise RunnerError(
                f"The worker code could not store the outcome of {message.task_name}[{message.task_id}] "
                f"and handed the message back: {info.retval!r}. In a test this usually means the "
                "database is unusable (an earlier error broke the test's transaction); see the log.")

    def _park(self, message: CapturedMessage, reason: str, error: str) -> None:
        """Park a message the worker cannot run (unknown task, undecodable body), as the worker does."""
        from .worker.delivery import Delivery
        from .worker.failures.unrunnable import park_in_worker

        logger.error("Parking message %s of key %r (%s): %s", message.task_id or "?", message.key, reason,
                     error)
        park_in_worker(dataclasses.asdict(Delivery.from_message(message, message.partition)), reason, error)

    def _on_postrun(self, sender: Any = None, task_id: str | None = None, task: Any = None,
                    args: Any = None, kwargs: Any = None, retval: Any = None, state: str | None = None,
                    **_: Any) -> None:
        """Note how one run of an ordered task by this runner ended."""
        if not self._running or task is None or getattr(task, "ordered_control", False):
            return
        request = task.request
        if request.is_eager or not isinstance(task, GuardedTaskMixin):
            return
        from .worker.failures.retry import InPlaceRetry, Parked

        exception = retval if isinstance(retval, BaseException) else None
        retry_in = None
        if state == states.SUCCESS:
            outcome = "succeeded"
        elif state == states.RETRY:
            outcome = "retrying"
            retry_in = retval.countdown if isinstance(retval, InPlaceRetry) else None
            exception = getattr(retval, "exc", None) or exception
        elif state == states.IGNORED:
            outcome = "parked" if isinstance(retval, Parked) else "ignored"
            exception = None
        else:
            outcome = "failed"
        key = getattr(request, KEY_HEADER, None)
        self.history.append(Execution(
            task_name=task.name, task_id=str(task_id or ""), key=None if key is None else str(key),
            args=tuple(args or ()), kwargs=dict(kwargs or {}), outcome=outcome, exception=exception,
            retry_in=retry_in))

    # The operator's actions ---------------------------------------------------------------------

    def replay(self, key: object, *, requested_by: str = "") -> ControlRequest:
        """:func:`ordered_tasks.replay`, its control message published now rather than at commit.

        A test's transaction never commits, so the request would otherwise
        wait for an on-commit callback that never runs. Call :meth:`run` to
        apply it.
        """
        from . import actions

        with self._committing():
            return actions.replay(key, requested_by=requested_by, app=self.app)

    def skip(self, key: object, *, requested_by: str = "") -> ControlRequest:
        """:func:`ordered_tasks.skip`, its control message published now (see :meth:`replay`)."""
        from . import actions

        with self._committing():
            return actions.skip(key, requested_by=requested_by, app=self.app)

    def _committing(self) -> Any:
        """Run the on-commit callbacks registered inside, as a commit would (Django's test helper)."""
        from django.test import TestCase

        return TestCase.captureOnCommitCallbacks(using=self.using, execute=True)


if importlib.util.find_spec("pytest") is not None:
    import pytest

    @pytest.fixture
    def ordered_tasks_runner(db: None) -> Iterator[OrderedTasksRunner]:
        """An active :class:`OrderedTasksRunner` for the test (and the ``db`` fixture)."""
        with OrderedTasksRunner() as runner:
            yield runner
