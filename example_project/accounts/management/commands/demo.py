"""``manage.py demo``: the same burst of account events under plain Celery and ordered_tasks."""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

from celery import current_app
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from django.db.models import Sum
from kombu import Queue

from accounts import brokers
from accounts.console import ProgressBar
from accounts.events import actual_state, expected_state, history, interleave
from accounts.models import Account, HandledEvent
from accounts.plot import Point, Timeline, plot
from accounts.tasks import PLAIN_QUEUE, ordered_event, plain_event
from ordered_tasks.conf import get_settings
from ordered_tasks.queues import partition_queue

PROJECT_DIR = Path(__file__).resolve().parents[3]
#: Accounts drawn in the plot: the first ones published, whose events are interleaved together.
PLOTTED_ACCOUNTS = 16
EVENT_NAMES = {"add_office": "add office {office}", "add_members": "add members to {office}",
               "move_member": "move a member to {office}", "remove_member": "remove a member"}


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
    timeline: Timeline | None = None
    inconsistent_accounts: set[int] = field(default_factory=set)


class _Raw:
    """``self.stdout`` without the newline it adds to every write (the progress bar redraws lines)."""

    def __init__(self, out: OutputWrapper) -> None:
        self.out = out

    def write(self, text: str, /) -> None:
        self.out.write(text, ending="")

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return bool(self.out.isatty())


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
        parser.add_argument("--broker", choices=sorted(brokers.LOCAL_URLS), default=None,
                            help="Broker to run on, at CELERY_BROKER_URL if that is one of its kind, "
                                 "else at its usual local address (default: the kind of "
                                 "CELERY_BROKER_URL, else redis).")
        parser.add_argument("--plot", default="demo.png",
                            help="PNG file to draw the runs' event timelines in (default: demo.png); "
                                 "'' for none.")
        parser.add_argument("--log", default="demo-workers.log",
                            help="File that receives the workers' output (default: demo-workers.log).")

    def handle(self, *args: Any, **options: Any) -> None:
        for option in ("accounts", "workers", "active"):
            if options[option] < 1:
                raise CommandError(f"--{option} must be at least 1")
        try:
            kind, url = brokers.choose(options["broker"], os.environ.get("CELERY_BROKER_URL"))
            brokers.check(kind, url)
        except brokers.BrokerUnavailable as exc:
            raise CommandError(str(exc)) from exc
        # Celery reads CELERY_BROKER_URL before its settings; the workers inherit it.
        os.environ["CELERY_BROKER_URL"] = url
        current_app.conf.update(broker_url=url)
        call_command("migrate", verbosity=0, interactive=False)
        HandledEvent.objects.all().delete()
        rng = random.Random(options["seed"])
        accounts = list(range(1, options["accounts"] + 1))
        burst = interleave(accounts, options["active"], rng)
        log_path = Path(options["log"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.stdout.write(
            f"{len(burst)} events of {len(accounts)} accounts, {options['active']} accounts interleaved "
            f"at a time, {options['workers']} worker processes per run\n"
            f"broker: {brokers.display(url)}, worker output: {log_path}\n")
        with log_path.open("wb") as log:
            outcomes = [
                self.run("plain Celery", plain_event, burst, accounts, options, log, log_path),
                self.run("ordered_tasks", ordered_event, burst, accounts, options, log, log_path),
            ]
        self.report(outcomes)
        if options["plot"]:
            self.plot(Path(options["plot"]), outcomes, accounts[:PLOTTED_ACCOUNTS])

    def run(self, label: str, task: Any, burst: list[Any], accounts: list[int], options: dict[str, Any],
            log: IO[bytes], log_path: Path) -> Outcome:
        ordered = task is ordered_event
        bar = ProgressBar(_Raw(self.stdout), label, len(burst))
        bar.status(f"starting {options['workers']} worker processes ...")
        Account.objects.all().delete()
        Account.objects.bulk_create([Account(pk=a, name=f"account {a}") for a in accounts])
        self.purge(ordered)
        log.write(f"===== {label}: worker output, {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
        log.flush()
        workers, nodes = self.start_workers(ordered, options["workers"], log)
        try:
            self.wait_for_nodes(nodes, workers, time.monotonic() + 60, label, log_path)
            bar.restart_clock()
            started, wall_start = time.monotonic(), time.time()
            for account, seq, kind, data in burst:
                task.delay(account_id=account, seq=seq, kind=kind, data=data)
            published = time.monotonic()
            self.wait_processed(len(burst), started + options["timeout"], workers, bar, label, log_path)
            finished = time.monotonic()
        finally:
            bar.finish()
            self.stop_workers(workers)
        outcome = self.evaluate(label, len(burst), accounts, len(burst) / max(published - started, 1e-9),
                                len(burst) / max(finished - started, 1e-9))
        outcome.timeline = self.timeline(outcome, "ordered" if ordered else "plain", wall_start)
        return outcome

    def purge(self, ordered: bool) -> None:
        conf = get_settings()
        queues = ([partition_queue(conf.queue_prefix, p) for p in range(conf.partitions)]
                  if ordered else [Queue(PLAIN_QUEUE)])
        with current_app.connection_for_write() as conn:
            for queue in queues:
                bound = queue(conn.default_channel)
                bound.declare()
                bound.purge()

    def start_workers(self, ordered: bool, count: int,
                      log: IO[bytes]) -> tuple[subprocess.Popen[bytes], list[str]]:
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
        process = subprocess.Popen(argv, cwd=PROJECT_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
        return process, nodes

    def wait_for_nodes(self, nodes: list[str], process: subprocess.Popen[bytes], deadline: float,
                       label: str, log_path: Path) -> None:
        waiting = set(nodes)
        while waiting:
            self.check_alive(process, label, log_path)
            if time.monotonic() > deadline:
                raise CommandError(f"the {label} workers {sorted(waiting)} did not start in time; "
                                   f"see their output in {log_path}")
            for reply in current_app.control.ping(destination=sorted(waiting), timeout=0.5) or []:
                waiting -= set(reply)

    def wait_processed(self, total: int, deadline: float, process: subprocess.Popen[bytes],
                       bar: ProgressBar, label: str, log_path: Path) -> None:
        while True:
            done = Account.objects.aggregate(done=Sum("processed"))["done"] or 0
            bar.update(done)
            if done >= total:
                return
            self.check_alive(process, label, log_path)
            if time.monotonic() > deadline:
                raise CommandError(f"the {label} workers did not process every event in time "
                                   f"({done}/{total}); see their output in {log_path}")
            time.sleep(0.1)

    def check_alive(self, process: subprocess.Popen[bytes], label: str, log_path: Path) -> None:
        status = process.poll()
        if status is not None:
            raise CommandError(f"the {label} workers exited with status {status}; "
                               f"see their output in {log_path}")

    def stop_workers(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def evaluate(self, label: str, tasks: int, accounts: list[int], publish_rate: float,
                 throughput: float) -> Outcome:
        rows = list(Account.objects.filter(pk__in=accounts))
        inconsistent = {a.pk for a in rows if actual_state(a) != expected_state(history(a.pk))}
        return Outcome(label, tasks, len(accounts), len(inconsistent),
                       sum(a.out_of_order for a in rows), sum(a.failed for a in rows),
                       publish_rate, throughput, inconsistent_accounts=inconsistent)

    def timeline(self, outcome: Outcome, run: str, wall_start: float) -> Timeline:
        points = [Point(e.account_id, e.seq, e.finished - wall_start, e.out_of_order, e.failed)
                  for e in HandledEvent.objects.filter(run=run)]
        caption = (f"{outcome.inconsistent}/{outcome.accounts} accounts left inconsistent, "
                   f"{outcome.out_of_order} events run out of order")
        return Timeline(outcome.label, caption, points, outcome.inconsistent_accounts)

    def report(self, outcomes: list[Outcome]) -> None:
        width = 16
        lines = ["", "".ljust(28) + "".join(o.label.rjust(width) for o in outcomes)]
        rows: list[tuple[str, Callable[[Outcome], str]]] = [
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

    def plot(self, path: Path, outcomes: list[Outcome], accounts: list[int]) -> None:
        if importlib.util.find_spec("matplotlib") is None:
            self.stdout.write('no plot: matplotlib is not installed (pip install -e ".[demo]")')
            return
        names = {seq: EVENT_NAMES[kind].format(**data)
                 for seq, (kind, data) in enumerate(history(0), start=1)}
        path.parent.mkdir(parents=True, exist_ok=True)
        plot(path, [o.timeline for o in outcomes if o.timeline], accounts, names,
             f"When each event finished, accounts {accounts[0]}-{accounts[-1]} of {outcomes[0].accounts}")
        self.stdout.write(f"plot of accounts {accounts[0]}-{accounts[-1]}: {path}")
