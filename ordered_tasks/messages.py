"""Control messages: replay, skip and retry wake-ups, published into the key's own partition queue."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery import Celery, Task

from .decorators import ordered_task
from .options import CONTROL_TASK
from .states import ControlAction
from .task import OrderedTaskMixin, worker_side


@ordered_task(key="key", name=CONTROL_TASK, bind=True, ignore_result=True, ordered_control=True)
def control(self: Task[Any, Any], key: str, action: str, request_id: int | None = None,
            due: str | None = None) -> str:
    """Apply a replay, skip or retry wake-up to ``key``, on its partition's consumer.

    The body is the worker's (see :data:`~ordered_tasks.task.WORKER_SIDE`):
    a control message only runs in an ordered worker, behind every message
    of its partition published before it.
    """
    guarded: Any = self
    return str(worker_side(guarded.worker_side).control(self, key, action, request_id, due))


def publish_control(app: Celery, key: str, action: ControlAction, request_id: int | None = None,
                    eta: datetime | None = None, due: datetime | None = None) -> None:
    """Publish one control message into the partition queue of ``key``."""
    task: Any = app.tasks[CONTROL_TASK]
    kwargs = {"key": key, "action": action.value, "request_id": request_id,
              "due": due.isoformat() if due is not None else None}
    options = task.publish_options((), kwargs, {})
    if eta is not None:
        options["eta"] = eta  # a wake-up is not ordered work: only the control task may wait
    super(OrderedTaskMixin, task).apply_async((), kwargs, **options)


def publish_wake(app: Celery, key: str, due_at: datetime) -> None:
    """Have the consumer look at ``key`` again at ``due_at`` (an in-place retry is due)."""
    publish_control(app, key, ControlAction.WAKE, eta=due_at, due=due_at)
