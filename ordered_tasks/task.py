"""The base class of ordered tasks: key extraction and queue choice at publish time."""

from __future__ import annotations

from typing import Any

from celery import Task

from .conf import get_settings
from .keys import KeySpec
from .options import KEY_HEADER, PARTITION_HEADER, check_publish_options
from .partitioning import partition_of
from .queues import partition_queue
from .worker.failures.retry import GuardedTaskMixin


class OrderedTaskMixin(GuardedTaskMixin):
    """Mixed in front of the app's Task class by :func:`ordered_task`."""

    #: Where the ordering key lives in the task's arguments (set by the decorator).
    ordered_key: KeySpec
    #: The message is acknowledged after the task ran, so a crash cannot lose it.
    acks_late = True
    name: str

    def publish_options(self, args: Any, kwargs: Any, options: dict[str, Any]) -> dict[str, Any]:
        """Validate one publish and return its options with queue and headers set."""
        check_publish_options(self.name, options)
        key = self.ordered_key.canonical(args, kwargs)
        conf = get_settings()
        partition = partition_of(key, conf.partitions)
        headers = dict(options.get("headers") or {})
        headers[KEY_HEADER] = key
        headers[PARTITION_HEADER] = partition
        return {**options, "queue": partition_queue(conf.queue_prefix, partition), "headers": headers}

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: Any = None,
                    producer: Any = None, link: Any = None, link_error: Any = None,
                    shadow: Any = None, **options: Any) -> Any:
        """Publish to the key's partition queue (see :meth:`celery.app.task.Task.apply_async`)."""
        options = self.publish_options(args, kwargs, options)
        return super().apply_async(  # type: ignore[misc]
            args, kwargs, task_id, producer, link, link_error, shadow, **options)

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """Like ``delay`` after the transaction commits; bad keys raise now."""
        self.publish_options(args, kwargs, {})
        super().delay_on_commit(*args, **kwargs)  # type: ignore[misc]

    def apply_async_on_commit(self, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        """Like ``apply_async`` after the transaction commits; bad input raises now."""
        self.publish_options(args, kwargs, options)
        super().apply_async_on_commit(args, kwargs, **options)  # type: ignore[misc]


class OrderedTask(OrderedTaskMixin, Task):  # type: ignore[misc,type-arg]
    """An ordered task on Celery's plain Task class.

    Tasks made by :func:`~ordered_tasks.ordered_task` derive from the app's
    own Task class instead (``DjangoTask`` in a Django project); test for
    them with ``isinstance(task, OrderedTaskMixin)``.
    """
