"""One seeded run: workers, workload and nemesis together, then healing, the history and the checker."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from celery import Celery, chain
from kombu import Queue

from ordered_tasks import KeyNotBlockedError, UnknownKeyError, partition_for, replay, skip
from ordered_tasks.conf import get_settings
from ordered_tasks.queues import partition_queue
from tests.conftest import queue_depths
from tests.nemesis import history as h
from tests.nemesis.checker import Violation, check
from tests.nemesis.faults import Nemesis, NemesisConfig
from tests.nemesis.workload import Idle, Operator, Publish, Revoke, WorkloadConfig, generate
from tests.testapp.nemesis_tasks import SELF_RETRY_STEP, STEP, events_key, poison_key

#: Switches that hit the bugs reported on each broker; off in CI runs until they are fixed.
KNOWN_BUGS: dict[str, set[str]] = {
    "redis": set(),
    "rabbitmq": set(),
}


@dataclass
class Plan:
    """Everything a run is made of besides its seed."""

    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    nemesis: NemesisConfig = field(default_factory=NemesisConfig)
    processes: int = 2
    #: The pool and concurrency of each worker process, and the window (None: drawn from the seed).
    pool: tuple[str, int] | None = None
    window: int | None = None
    drain_timeout: float = 150.0
    #: Seconds the nemesis goes on after the last publish, while the backlog drains.
    fault_tail: float = 15.0
    disruptive: bool = False


def plan(profile: str, broker: str, enable: str = "", disable: str = "") -> Plan:
    """The ``ci`` or ``long`` plan for ``broker``; ``enable``/``disable`` list switches (or ``all``).

    The ``ci`` plan leaves out the switches of :data:`KNOWN_BUGS`; the ``long``
    plan turns on everything except the disruptive faults, with longer runs,
    several long idle periods and tasks longer than 25 s.
    """
    if profile == "long":
        result = Plan(workload=WorkloadConfig(bursts=14, long_idles=4, long_tasks=True, keys=80,
                                              raw_without_partition=True), drain_timeout=240.0)
    else:
        result = Plan(workload=WorkloadConfig(bursts=6, burst_size=(15, 40), raw_without_partition=True))
        for name in KNOWN_BUGS.get(broker, set()):
            _switch(result, name, False)
    names = [n.strip() for n in enable.split(",") if n.strip()]
    if "all" in names:
        names = [n for n in WorkloadConfig.switches() + NemesisConfig.switches()
                 if n not in ("broker_restart", "db_outage")]
    for name in names:
        _switch(result, name, True)
    for name in (n.strip() for n in disable.split(",") if n.strip()):
        _switch(result, name, False)
    result.disruptive = result.nemesis.broker_restart or result.nemesis.db_outage
    return result


def _switch(target: Plan, name: str, value: bool) -> None:
    for config in (target.workload, target.nemesis):
        if name in config.switches():
            setattr(config, name, value)
            return
    raise ValueError(f"no switch named {name!r}; switches: "
                     f"{WorkloadConfig.switches() + NemesisConfig.switches()}")


#: The pools (with their concurrency) and windows a run draws from (8 and 16 spill a hot key's
#: waiting messages, in batches of 4 and 8).
POOLS: tuple[tuple[str, int], ...] = (("prefork", 1), ("prefork", 2), ("threads", 4), ("threads", 8), ("solo", 1))
WINDOWS = (1, 4, 8, 16)


def drawn(p: Plan, seed: int) -> Plan:
    """``p`` with the pool, concurrency and window it leaves open drawn from ``seed``."""
    rng = random.Random(seed ^ 0x9001)
    pool, window = rng.choice(POOLS), rng.choice(WINDOWS)
    return replace(p, pool=p.pool or pool, window=p.window or window)


def describe(p: Plan) -> str:
    """The switches that are on, and the pool and window, for the report."""
    on = [n for c in (p.workload, p.nemesis) for n in c.switches() if getattr(c, n)]
    pool = f"; pool {p.pool[0]} x{p.pool[1]}, window {p.window}" if p.pool else ""
    return ",".join(on) + pool


@dataclass
class Outcome:
    """A finished run."""

    seed: int
    broker: str
    plan: Plan
    history: h.History
    violations: list[Violation]
    seconds: float

    def report(self) -> str:
        faults = {}
        for f in self.history.faults:
            faults[f.kind] = faults.get(f.kind, 0) + 1
        lines = [f"nemesis seed {self.seed} on {self.broker}: {len(self.violations)} violation(s) in "
                 f"{self.seconds:.0f} s; {len(self.history.publishes)} publishes, "
                 f"{len(self.history.executions)} executions, faults {faults}",
                 f"switches on: {describe(self.plan)}",
                 f"replay with: NEMESIS_SEED={self.seed}"]
        shown = [v for v in self.violations if v.rule != "not-run"]
        lines += [f"  {v}" for v in shown[:40]]
        if len(shown) > 40:
            lines.append(f"  ... and {len(shown) - 40} more")
        not_run = [v.detail.split(" ", 1)[0] for v in self.violations if v.rule == "not-run"]
        if not_run:
            lines.append(f"  [not-run] {len(not_run)} message(s) of stalled partitions did not run: "
                         + ", ".join(not_run[:8]) + (", ..." if len(not_run) > 8 else ""))
        return "\n".join(lines)


class Sampler:
    """Samples the depth of every partition queue once a second, from a thread."""

    def __init__(self, app: Celery, interval: float = 1.0) -> None:
        self.app, self.interval = app, interval
        self.samples: list[h.Sample] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def depths(self) -> dict[int, int]:
        conf = get_settings()
        return {conf.partition_of_queue(name): n for name, n in queue_depths(self.app).items()}

    def _loop(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.samples.append(h.Sample(time.time(), self.depths()))
            except Exception:  # a broker hiccup: the next sample will do
                time.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(30)


class Driver:
    """Executes the workload's operations in publish order, on one producer connection."""

    def __init__(self, app: Celery, results: redis.Redis, run: str, prefix: str, seed: int) -> None:
        self.app, self.results, self.run, self.prefix = app, results, run, prefix
        self.rng = random.Random(seed ^ 0x0BE7A702)
        self.published: list[h.Publish] = []
        self.declared: set[str] = set()

    def do(self, op: Any, producer: Any) -> None:
        if isinstance(op, Publish):
            self.publish(op, producer)
        elif isinstance(op, Idle):
            time.sleep(op.seconds)
        elif isinstance(op, Operator):
            blocked = blocked_keys(self.prefix)
            if blocked:
                key = blocked[int(op.pick * len(blocked))]
                self.operate(key, op.action, op.heal)
        elif isinstance(op, Revoke):
            plain = [i for i, p in enumerate(self.published) if p.kind != "chain"]
            if len(plain) >= op.back:
                index = plain[-op.back]
                self.app.control.revoke(self.published[index].task_id)
                self.published[index] = replace(self.published[index], revoked=True)

    def publish(self, op: Publish, producer: Any) -> None:
        kwargs = {"run": self.run, "key": op.key, "seq": op.seq, "sleep": op.sleep, "fail": op.fail}
        if op.poison:
            self.results.set(poison_key(self.run, op.key, op.seq, 0), 1)
        started = time.time()
        if op.kind == "chain":
            task = self.app.tasks[STEP]
            links = [task.si(**{**kwargs, "link": i}) for i in range(op.links)]
            result = chain(*links).apply_async(producer=producer)
            while result.parent is not None:
                result = result.parent
            task_id = result.id
        elif op.kind == "raw":
            task_id = self.publish_raw(op, kwargs, producer)
        else:
            name = SELF_RETRY_STEP if op.kind == "self_retry" else STEP
            task_id = self.app.tasks[name].apply_async(kwargs=kwargs, producer=producer).id
        self.published.append(h.Publish(op.key, op.seq, task_id, started, op.kind, op.links))

    def publish_raw(self, op: Publish, kwargs: dict[str, Any], producer: Any) -> str:
        """A protocol-2 message built by hand, as a producer in another language would send it."""
        partition = partition_for(op.key)
        queue: Queue = partition_queue(get_settings().queue_prefix, partition)
        task_id = str(uuid.uuid4())
        headers: dict[str, Any] = {
            "lang": "py", "task": STEP, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
            "root_id": task_id, "parent_id": None, "argsrepr": "()", "kwargsrepr": repr(kwargs),
            "origin": "nemesis-raw-producer", "ignore_result": True}
        if op.key_header:
            headers["ordered_key"] = op.key
        if op.partition_header:
            headers["ordered_partition"] = partition
        body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
        declare = [] if queue.name in self.declared else [queue]
        self.declared.add(queue.name)
        producer.publish(body.encode(), exchange=queue.exchange, routing_key=queue.routing_key,
                         headers=headers, content_type="application/json", content_encoding="utf-8",
                         correlation_id=task_id, delivery_mode=2, declare=declare)
        return task_id

    def operate(self, key: str, action: str, heal: bool) -> None:
        """Replay (after clearing the key's poison when ``heal``) or skip a blocked key."""
        if heal and action == "replay":
            for name in self.results.scan_iter(f"{self.run}:poison:{key}:*", count=1000):
                self.results.delete(name)
        call = replay if action == "replay" else skip
        try:
            call(key, requested_by="nemesis", app=self.app)
        except (KeyNotBlockedError, UnknownKeyError):
            pass  # its state changed meanwhile


def blocked_keys(prefix: str, statuses: tuple[str, ...] = ("blocked",)) -> list[str]:
    from ordered_tasks.models import AccountState

    return list(AccountState.objects.filter(key__startswith=prefix + "-", status__in=statuses)
                .order_by("key").values_list("key", flat=True))


def parked_rows(prefix: str) -> list[h.Row]:
    from ordered_tasks.models import ParkedMessage

    rows = []
    for row in ParkedMessage.objects.filter(key__startswith=prefix + "-").order_by("key", "position"):
        arguments = row.arguments()
        message = None
        if arguments is not None and isinstance(arguments[1], dict) and "seq" in arguments[1]:
            kw = arguments[1]
            message = (str(kw.get("key")), int(kw["seq"]), int(kw.get("link", 0)))
        rows.append(h.Row(row.task_id, row.state, row.reason, message))
    return rows


def collect(results: redis.Redis, run: str, prefix: str, driver: Driver, faults: list[h.Fault],
            sampler: Sampler) -> h.History:
    return h.History(publishes=list(driver.published),
                     executions=h.executions_from_events(results.lrange(events_key(run), 0, -1)),
                     faults=list(faults), samples=list(sampler.samples), rows=parked_rows(prefix),
                     final_depths=sampler.depths(), partitions=get_settings().partitions)


def settled(history: h.History, prefix: str) -> bool:
    """Every message ran or has a row that is not waiting, no key is held, every queue is empty."""
    from tests.nemesis.checker import expected_messages

    ran = {ex.message for ex in history.executions if ex.outcome == "ok"}
    done_rows = {r.message for r in history.rows if r.state != "parked"} | {
        r.task_id for r in history.rows if r.state != "parked"}
    pending = [m for m, tid in expected_messages(history).items()
               if m not in ran and m not in done_rows and tid not in done_rows]
    running = [ex for ex in history.executions if ex.end is None and ex.busy_until() > time.time()]
    return (not pending and not running and not any(history.final_depths.values())
            and not blocked_keys(prefix, ("blocked", "retrying")))


def heal(driver: Driver, faults: list[h.Fault], sampler: Sampler, deadline: float) -> h.History:
    """Unblock every key (replay after clearing its poison, or skip) until everything drained."""
    asked: dict[str, float] = {}
    while True:
        history = collect(driver.results, driver.run, driver.prefix, driver, faults, sampler)
        if settled(history, driver.prefix) or time.monotonic() > deadline:
            return history
        for key in blocked_keys(driver.prefix):
            if time.monotonic() - asked.get(key, -1e9) > 10.0:
                asked[key] = time.monotonic()
                driver.operate(key, driver.rng.choice(["replay", "replay", "skip"]), heal=True)
        time.sleep(1.0)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM stops the run as Ctrl-C does: the nemesis continues the workers it stopped, fixtures end them.

    Without it a terminated run leaves a worker stopped (SIGSTOP) beside its
    launcher, which holds the test database and the leases of the next run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(app: Celery, broker: str, start_workers: Callable[..., Any], results: redis.Redis, seed: int,
        the_plan: Plan) -> Outcome:
    """One run of ``the_plan`` with ``seed``: the history and what the checker found."""
    began = time.monotonic()
    prefix = f"n{seed}x{uuid.uuid4().hex[:4]}"
    run_id = f"nemesis:{prefix}"
    workload = generate(seed, the_plan.workload, prefix)
    the_plan = drawn(the_plan, seed)
    assert the_plan.pool is not None
    (pool, concurrency), window = the_plan.pool, the_plan.window
    options = ("--pool", pool, "--concurrency", str(concurrency))
    launchers = [start_workers(the_plan.processes, *options, window=window)]
    nemesis = Nemesis(seed ^ 0x5EED, the_plan.nemesis, launchers,
                      lambda: start_workers(the_plan.processes, *options, ready=False, window=window),
                      the_plan.disruptive, slots=concurrency)
    driver = Driver(app, results, run_id, prefix, seed)
    with interruptible(), Sampler(app) as sampler:
        nemesis.start()
        try:
            with app.producer_or_acquire() as producer:  # one connection: one producer's publish order
                for op in workload.ops:
                    driver.do(op, producer)
            time.sleep(the_plan.fault_tail)
        finally:
            faults = nemesis.stop()
        assert nemesis.error is None, f"the nemesis failed: {nemesis.error!r}"
        history = heal(driver, faults, sampler, time.monotonic() + the_plan.drain_timeout)
        time.sleep(3.0)  # let a late (stale) execution show up
        history = collect(results, run_id, prefix, driver, faults, sampler)
    outcome = Outcome(seed, broker, the_plan, history, check(history), time.monotonic() - began)
    if outcome.violations and os.environ.get("NEMESIS_DUMP_DIR"):
        path = os.path.join(os.environ["NEMESIS_DUMP_DIR"], f"nemesis-{broker}-{seed}.json")
        with open(path, "w") as f:
            f.write(history.to_json())
    return outcome
