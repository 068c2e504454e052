"""``manage.py ordered_worker``: launch and supervise the partition workers."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ordered_tasks.conf import MAX_PORT, get_settings
from ordered_tasks.exceptions import ConfigurationError, OrderedTaskError
from ordered_tasks.worker.launch.options import (
    POOLS,
    check_celery_args,
    check_concurrency,
    child_hostname,
    parse_partitions,
    split_partitions,
)
from ordered_tasks.worker.launch.supervisor import Child, Supervisor, child_env


class Command(BaseCommand):
    """Run ordered workers for some or all partitions."""

    help = (
        "Run Celery workers for the ordered partition queues, one task at a time per "
        "key, and supervise them. Safe Celery worker options go after '--', for "
        "example: ordered_worker --processes 4 -- --loglevel INFO -E"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--partitions", default=None,
                            help="Partitions to serve, e.g. '0-7,12' (default: all).")
        parser.add_argument("--processes", type=int, default=None,
                            help="Worker processes to split them over "
                                 "(default: CPU count, at most one per partition).")
        parser.add_argument("--pool", choices=POOLS, default="prefork",
                            help="Celery pool of each worker (default: prefork).")
        parser.add_argument("--concurrency", type=int, default=1,
                            help="Pool size of each worker: tasks of different keys it runs at "
                                 "once (default: 1; solo: 1).")
        parser.add_argument("--hostname", default="ordered@%h",
                            help="Node name template; worker i gets NAME-i@HOST "
                                 "(default: ordered@%%h).")
        parser.add_argument("--app", default=None,
                            help="Celery app, as for 'celery -A' "
                                 "(default: ORDERED_TASKS['CELERY_APP'] or the current app).")
        parser.add_argument("--metrics-port", type=int, default=None,
                            help="Serve Prometheus metrics: worker i on this port + i "
                                 "(default: ORDERED_TASKS['METRICS_PORT'], None: no metrics).")
        parser.add_argument("celery_args", nargs="*",
                            help="Further 'celery worker' options, after '--'.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            children = self.plan(options)
        except OrderedTaskError as exc:
            raise CommandError(str(exc)) from exc
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO,
                                format="[%(asctime)s: %(levelname)s/supervisor] %(message)s")
        env = child_env(settings.SETTINGS_MODULE, sys.path)
        status = Supervisor(children, env).run()
        if status:
            raise CommandError(f"a worker exited with status {status}", returncode=status)

    def plan(self, options: dict[str, Any]) -> list[Child]:
        """Check the options and describe the worker processes to run."""
        celery_args = list(options["celery_args"])
        check_celery_args(celery_args)
        conf = get_settings()
        partitions = parse_partitions(options["partitions"], conf.partitions)
        concurrency = options.get("concurrency", 1)
        check_concurrency(concurrency, options["pool"])
        cores = min(os.cpu_count() or 1, len(partitions))
        # A prefork pool process takes a core; a pool of threads or greenlets shares its worker's.
        per_worker = cores // concurrency if options["pool"] == "prefork" else cores
        processes = options["processes"] or max(1, per_worker)
        groups = split_partitions(partitions, processes)
        asked = options.get("metrics_port")
        metrics_port = metrics_ports(conf.metrics_port if asked is None else asked, len(groups))
        children = []
        for index, group in enumerate(groups):
            name = child_hostname(options["hostname"], index)
            argv = [sys.executable, "-m", "ordered_tasks.worker.launch.child",
                    "--partitions", ",".join(map(str, group)), "--pool", options["pool"],
                    "--hostname", name, "--concurrency", str(concurrency)]
            if options["app"]:
                argv += ["--app", options["app"]]
            if metrics_port is not None:
                argv += ["--metrics-port", str(metrics_port + index)]
            children.append(Child(name=name, argv=[*argv, "--", *celery_args]))
        return children


def metrics_ports(base: int | None, processes: int) -> int | None:
    """The metrics port of worker 0 (worker *i* takes ``base + i``), checked; None: no metrics."""
    if base is None:
        return None
    if not 1 <= base <= MAX_PORT - processes + 1:
        raise ConfigurationError(
            f"Metrics port {base}: the {processes} worker process(es) would serve on ports {base} to "
            f"{base + processes - 1}; use a port from 1 to {MAX_PORT - processes + 1}.")
    from ordered_tasks.worker.health.metrics import require_client

    require_client()
    return base
