"""Start-up check of every Celery worker in a project that uses ordered_tasks."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps

from ...conf import get_settings
from ...exceptions import UnsafeWorkerOptionError
from ..setup import ORDERED_WORKERS

logger = logging.getLogger(__name__)



def consumed_partition_queues(app: Celery) -> list[str]:
    """Names of the partition queues a worker of ``app`` is about to consume."""
    queues = app.amqp.queues
    names = queues.consume_from if queues.consume_from is not None else queues
    conf = get_settings()
    return sorted(name for name in names if conf.partition_of_queue(name) is not None)


def warn_if_ordered_tasks_wait(app: Celery) -> None:
    """Say so when a plain worker starts in a project whose ordered tasks it will never run.

    Started out of habit instead of ``ordered_worker``, it leaves every
    ordered task PENDING without a hint.
    """
    from ...routing import key_spec_for

    names = sorted(name for name, task in app.tasks.items()
                   if not name.startswith("ordered_tasks.") and key_spec_for(app, name, task) is not None)
    if names:
        shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        logger.warning(
            "This Celery worker consumes no partition queue, so it runs none of the project's "
            "%d ordered task(s) (%s). They wait in their partition queues until "
            "'python manage.py ordered_worker' runs; start it, or this warning is expected if "
            "it runs elsewhere.", len(names), shown)


class RefuseUnsafeConsumers(bootsteps.Step):  # type: ignore[misc]
    """Refuses to start a worker that would consume partition queues unsafely.

    A plain ``celery worker -Q <partition queue>`` (or one whose
    ``task_queues`` lists a partition queue) would run several messages of a
    partition at once and, on RabbitMQ, could become the partition's active
    consumer. Only workers started by ``manage.py ordered_worker`` may
    consume partition queues, with the pool and window it sets up.
    """

    name = "ordered_tasks.refuse_unsafe_consumers"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        app = worker.app
        ordered = consumed_partition_queues(app)
        if not ordered:
            if app not in ORDERED_WORKERS:
                warn_if_ordered_tasks_wait(app)
            return
        shown = ", ".join(ordered[:4]) + (" ..." if len(ordered) > 4 else "")
        setup = ORDERED_WORKERS.get(app)
        if setup is None:
            raise UnsafeWorkerOptionError(
                f"This worker would consume the partition queues {shown} of ordered_tasks, "
                "but it was not started by 'manage.py ordered_worker'. Remove them from -Q "
                "and task_queues, and run 'python manage.py ordered_worker' for them."
            )
        prefetch = app.conf.worker_prefetch_multiplier
        expected = setup.concurrency
        if worker.concurrency != expected or prefetch != 1:
            raise UnsafeWorkerOptionError(
                f"An ordered worker must run with concurrency {expected} (ordered_worker "
                f"--concurrency) and prefetch 1; this one has concurrency {worker.concurrency} "
                f"and prefetch multiplier {prefetch}. Do not override them (settings, -c, "
                "--autoscale, --prefetch-multiplier)."
            )
