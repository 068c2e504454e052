"""``manage.py demo``: the same burst of account events under plain Celery and ordered_tasks."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import current_app
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from kombu import Queue

from accounts.events import actual_state, expected_state, history, interleave
from accounts.models import Account
from accounts.tasks import PLAIN_QUEUE, ordered_event, plain_event
from ordered_tasks.conf import get_settings
from ordered_tasks.queues import partition_queue

PROJECT_DIR = Path(__file__).resolve().parents[3]


@dataclass
class Outcome:
    """What one run left behind."""

    label: str
    tasks: int
    accounts: int
    inconsistent: int
    out_of_order: int
    failed: int
    publish_rate: float
    throughput: float


class Command(BaseCommand):
    """Publish interleaved account events, run them twice, compare the accounts."""

    help = "Show plain Celery scrambling account events and ordered_tasks keeping them in order."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--accounts", type=int, default=120, help="Accounts to simulate.")
        parser.add_argument("--workers", type=int, default=4,
                            help="Worker processes for each run (plain: -c N, ordered: --processes N).")
        parser.add_argument("--active", type=int, default=12,
                            help="Accounts whose events are being published at the same moment.")
        parser.add_argument("--timeout", type=float, default=300.0, help="Seconds to wait for a run.")
        parser.add_argument("--seed", type=int, default=7, help="Seed of the interleaving.")

    def handle(self, *args: Any, **options: Any) -> None:
        self.check_broker()
        call_command("migrate", verbosity=0, interactive=False)
        rng = random.Random(options["seed"])
        accounts = list(range(1, options["accounts"] + 1))
        burst = interleave(accounts, options["active"], rng)
        self.stdout.write(
            f"{len(burst)} events for {len(accounts)} accounts, {options['active']} accounts "
            f"interleaved at a time, {options['workers']} worker processes, broker "
            f"{current_app.connection_for_write().as_uri()}\n")
        outcomes = [
            self.run("plain Celery", plain_event, burst, accounts, options),
            self.run("ordered_tasks", ordered_event, burst, accounts, options),
        ]
        self.report(outcomes)

    def check_broker(self) -> None:
        try:
            with current_app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1)
        except Exception as exc:
            raise CommandError(
                f"Cannot reach the broker {settings.CELERY_BROKER_URL!r}: {exc}. Start Redis "
                "(or set CELERY_BROKER_URL to a running broker) and try again.") from exc

    def run(self, label: str, task: Any, burst: list[Any], accounts: list[int],
            options: dict[str, Any]) -> Outcome:
        self.stdout.write(f"running {label} ...")
        Account.objects.all().delete()
        Account.objects.bulk_create([Account(pk=a, name=f"account {a}") for a in accounts])
        ordered = task is ordered_event
        self.purge(ordered)
        workers, nodes = self.start_workers(ordered, options["workers"])
        try:
            self.wait_for_nodes(nodes, deadline=time.monotonic() + 60)
            started = time.monotonic()
            for account, seq, kind, data in burst:
                task.delay(account_id=account, seq=seq, kind=kind, data=data)
            published = time.monotonic()
            self.wait_processed(len(burst), started + options["timeout"])
            finished = time.monotonic()
        finally:
            self.stop_workers(workers)
        return self.evaluate(label, len(burst), accounts,
                             len(burst) / max(published - started, 1e-9),
                             len(burst) / max(finished - started, 1e-9))

    def purge(self, ordered: bool) -> None:
        conf = get_settings()
        queues = ([partition_queue(conf.queue_prefix, p) for p in range(conf.partitions)]
                  if ordered else [Queue(PLAIN_QUEUE)])
        with current_app.connection_for_write() as conn:
            for queue in queues:
                bound = queue(conn.default_channel)
                bound.declare()
                bound.purge()

    def start_workers(self, ordered: bool, count: int) -> tuple[subprocess.Popen[bytes], list[str]]:
        host = socket.gethostname()
        quiet = ["--loglevel", "WARNING", "--without-gossip", "--without-mingle"]
        banner_off = ["-q"]
        if ordered:
            argv = [sys.executable, str(PROJECT_DIR / "manage.py"), "ordered_worker",
                    "--processes", str(count), "--hostname", "demo-ordered@%h", "--", *banner_off, *quiet]
            nodes = [f"demo-ordered-{i}@{host}" for i in range(count)]
        else:
            argv = [sys.executable, "-m", "celery", "-A", "example_project", *banner_off, "worker",
                    "--queues", PLAIN_QUEUE, "--concurrency", str(count),
                    "--hostname", "demo-plain@%h", *quiet]
            nodes = [f"demo-plain@{host}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(PROJECT_DIR), os.environ.get("PYTHONPATH", "")])}
        return subprocess.Popen(argv, cwd=PROJECT_DIR, env=env), nodes

    def wait_for_nodes(self, nodes: list[str], deadline: float) -> None:
        waiting = set(nodes)
        while waiting:
            if time.monotonic() > deadline:
                raise CommandError(f"workers {sorted(waiting)} did not start in time")
            for reply in current_app.control.ping(destination=sorted(waiting), timeout=0.5):
                waiting -= set(reply)

    def wait_processed(self, total: int, deadline: float) -> None:
        while sum(Account.objects.values_list("processed", flat=True)) < total:
            if time.monotonic() > deadline:
                raise CommandError("the workers did not process every event in time")
            time.sleep(0.1)

    def stop_workers(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def evaluate(self, label: str, tasks: int, accounts: list[int], publish_rate: float,
                 throughput: float) -> Outcome:
        inconsistent = 0
        for account in Account.objects.filter(pk__in=accounts):
            if actual_state(account) != expected_state(history(account.pk)):
                inconsistent += 1
        rows = Account.objects.filter(pk__in=accounts)
        return Outcome(label, tasks, len(accounts), inconsistent,
                       sum(a.out_of_order for a in rows), sum(a.failed for a in rows),
                       publish_rate, throughput)

    def report(self, outcomes: list[Outcome]) -> None:
        width = 16
        lines = ["", "".ljust(28) + "".join(o.label.rjust(width) for o in outcomes)]
        rows = [
            ("events", lambda o: str(o.tasks)),
            ("accounts left inconsistent", lambda o: f"{o.inconsistent}/{o.accounts}"),
            ("events run out of order", lambda o: str(o.out_of_order)),
            ("events failed", lambda o: str(o.failed)),
            ("publish rate (tasks/s)", lambda o: f"{o.publish_rate:.0f}"),
            ("throughput (tasks/s)", lambda o: f"{o.throughput:.0f}"),
        ]
        for title, value in rows:
            lines.append(title.ljust(28) + "".join(value(o).rjust(width) for o in outcomes))
        self.stdout.write("\n".join(lines) + "\n")
