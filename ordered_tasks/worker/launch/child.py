"""One ordered worker process: a Celery worker running one task at a time per key.

Started by the ``ordered_worker`` supervisor as
``python -m ordered_tasks.worker.launch.child --partitions 0,2 ... -- [celery flags]``.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from typing import Any, Sequence

from celery import Celery, signals

from ...exceptions import UnsafeWorkerOptionError
from .options import POOLS, check_celery_args, check_concurrency


def _first_come_first_served(sender: Any = None, **_: object) -> None:
    """Prefork with one pool process: hand it its next message while it still runs the current one.

    Celery's ``fair`` scheduling writes a message to a pool process only
    once the process is idle, so with one process every task waits for a
    round trip between the worker and its pool process. With one process
    there is nothing to be fair about; the messages waiting in the pipe
    belong to other keys, and if the process dies, Celery hands them to its replacement. With
    several processes, ``fair`` keeps a message from waiting behind a long
    task while another process is idle.

    The messages in the pipe are of other keys: the lanes start a key's next
    message only once the one before it settled.
    """
    sender.optimization = "fcfs"


def configure(app: Celery, partitions: Sequence[int], concurrency: int = 1,
              metrics_port: int | None = None) -> list[str]:
    """Make ``app`` a safe ordered worker for ``partitions``; return the queue names.

    The pool (``concurrency`` processes, threads or greenlets) runs messages
    of different keys at once, never two of one key. With ``metrics_port``,
    the worker serves its Prometheus metrics there once it is ready.
    """
    from ...conf import get_settings
    from ...plugin import install
    from ...queues import partition_queue
    from ..consumer import Leases
    from ..exclusivity.fencing import DEADLINES
    from ..failures.book import BOOK, Versions
    from ..redelivery.revokes import DurableRevokes
    from ..setup import ORDERED_WORKERS, OrderedWorker
    from .hub import ReadyAwareHubStep
    from .platform import die_with_parent

    install(app)
    ORDERED_WORKERS[app] = OrderedWorker(list(partitions), concurrency)
    app.conf.worker_consumer = "ordered_tasks.worker.consumer:OrderedConsumer"
    conf = get_settings()
    app.conf.worker_prefetch_multiplier = 1
    app.conf.worker_concurrency = concurrency
    app.conf.task_acks_late = True
    BOOK.share(Versions(conf.partitions), partitions)  # before the pool processes fork
    DEADLINES.share(conf.partitions)
    if metrics_port is not None:
        from ..health import metrics

        metrics.prepare(conf.partitions)  # the counters, shared with the pool processes
    queues = [partition_queue(conf.queue_prefix, p) for p in partitions]
    for queue in queues:
        app.amqp.queues.add(queue)
    if ReadyAwareHubStep not in app.steps["worker"]:
        app.steps["worker"].add(ReadyAwareHubStep)
    app.steps["consumer"].add(Leases)
    app.steps["consumer"].add(DurableRevokes)
    app.finalize(auto=True)
    app.loader.import_default_modules()  # the worker's tasks, found now rather than at worker start
    check_tasks(app)

    def recover(**_: object) -> None:
        from ..failures.control import recover_retries

        recover_retries(app, partitions)

    def report(sender: Any = None, **_: object) -> None:
        from ..health.figures import start_reporting

        setup = ORDERED_WORKERS[app]
        start_reporting(getattr(sender, "hostname", "") or "", app.conf.broker_url or "",
                        dict(app.conf.broker_transport_options or {}), keeper=lambda: setup.keeper)

    if concurrency == 1:
        signals.worker_init.connect(_first_come_first_served, weak=False)
    if metrics_port is not None:  # once the pool has started (its processes need no metrics socket)
        export = functools.partial(_export, app, metrics_port, list(partitions))
        signals.worker_ready.connect(export, weak=False)
    signals.worker_ready.connect(recover, weak=False)
    signals.worker_ready.connect(report, weak=False)
    # A pool process must not outlive its worker: it would run on unsupervised.
    signals.worker_process_init.connect(lambda **_: die_with_parent(signal.SIGKILL), weak=False)
    return [q.name for q in queues]


def _export(app: Celery, port: int, partitions: list[int], **_: object) -> None:
    """Serve the worker's Prometheus metrics on ``port`` (see :mod:`..health.metrics`)."""
    from ..health.metrics import serve

    serve(port, partitions, app.conf.broker_url or "", dict(app.conf.broker_transport_options or {}))


def check_tasks(app: Celery) -> None:
    """Refuse to start if an ordered task would be acknowledged before it runs; guard routed tasks."""
    from ...compat import guard_task
    from ...routing import key_spec_for
    from ...task import GuardedTaskMixin

    for name, task in app.tasks.items():
        if key_spec_for(app, name, task) is None:
            continue
        if not task.acks_late:
            raise UnsafeWorkerOptionError(
                f"Task {name} is ordered but has acks_late=False: its message would "
                "be lost if the worker died while running it. Remove acks_late=False."
            )
        guard_task(task, GuardedTaskMixin)


QUIET = ("-q", "--quiet")


def worker_argv(queues: Sequence[str], pool: str, hostname: str,
                celery_args: Sequence[str], concurrency: int = 1) -> list[str]:
    """The ``celery worker`` arguments of one ordered worker process.

    ``-q``/``--quiet`` (no start-up banner) is an option of ``celery`` itself
    and moves in front of ``worker``.
    """
    quiet = [a for a in celery_args if a in QUIET]
    return [
        *quiet, "worker", "--queues", ",".join(queues), "--concurrency", str(concurrency),
        "--prefetch-multiplier", "1", "--pool", pool, "--hostname", hostname,
        *(a for a in celery_args if a not in QUIET),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of a worker process (Django settings come from the environment)."""
    parser = argparse.ArgumentParser(prog="ordered_tasks.worker.launch.child")
    parser.add_argument("--partitions", required=True)
    parser.add_argument("--pool", choices=POOLS, default="prefork")
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--app", default=None)
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("celery_args", nargs="*")
    args = parser.parse_args(argv)
    check_celery_args(args.celery_args)
    check_concurrency(args.concurrency, args.pool)
    if args.pool == "gevent":  # as ``celery worker -P gevent`` does, before anything opens a socket
        from gevent import monkey

        monkey.patch_all()

    import django

    django.setup()
    from ...celery_app import find_celery_app

    app = find_celery_app(args.app)
    partitions = [int(p) for p in args.partitions.split(",")]
    queues = configure(app, partitions, args.concurrency, args.metrics_port)
    app.worker_main(worker_argv(queues, args.pool, args.hostname, args.celery_args, args.concurrency))


if __name__ == "__main__":
    main(sys.argv[1:])
