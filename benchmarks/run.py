"""Benchmarks: plain Celery, safe plain workers, a lock per key and ordered_tasks, side by side.

Run from the repository root (Redis, RabbitMQ and PostgreSQL on localhost)::

    pip install -e ".[bench]"
    python benchmarks/run.py                 # both brokers, 1, 2 and 4 processes, 3 repetitions
    python benchmarks/run.py --quick         # Redis only, 2 processes, fewer tasks, once
    python benchmarks/run.py --ordered-pool solo --variants ordered   # another pool
    python benchmarks/run.py --ordered-layout workers --variants ordered   # N workers of 1 process

It prints a table, writes ``benchmarks/results.json`` and, with matplotlib,
``docs/_static/benchmarks.png``. Every variant runs in the same invocation,
on the same broker and machine, so compare ratios rather than absolute
figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BROKERS = {"redis": "redis://127.0.0.1:6379/11", "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//"}
VARIANTS = ("default", "safe", "solo", "lock", "ordered")
LABELS = {
    "default": "plain Celery, default worker (prefork, early ack, prefetch 4)",
    "safe": "plain Celery, safe worker (late ack, prefetch 1)",
    "solo": "plain Celery, N solo workers (late ack, prefetch 1)",
    "lock": "plain Celery + Redis lock per key",
    "ordered": "ordered_tasks",
}


@dataclass
class Result:
    """The figures of one variant, broker and process count."""

    broker: str
    variant: str
    processes: int
    tasks: int
    publish_per_s: float = 0.0
    drain_per_s: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    order_violations: int = 0
    rss_mb: float = 0.0
    #: The drain rate of every repetition; ``drain_per_s`` is their median.
    drain_runs: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _env(broker_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(BENCH_BROKER=broker_url, DJANGO_SETTINGS_MODULE="bench_project.settings",
               PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _setup(broker_url: str) -> Any:
    """Django and the benchmark app, on ``broker_url``; the database is created if missing."""
    os.environ.update(_env(broker_url))
    if str(HERE) not in sys.path:
        sys.path[:0] = [str(HERE), str(ROOT)]
    import django

    django.setup()
    _create_database()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    from bench_project.celery import app

    return app


def _create_database() -> None:
    import psycopg
    from django.db import connection

    name = connection.settings_dict["NAME"]
    with psycopg.connect(host=connection.settings_dict["HOST"], user=connection.settings_dict["USER"],
                         dbname="postgres", autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            admin.execute(f'CREATE DATABASE "{name}"')


def _one_pooled_worker(pool: str, layout: str) -> bool:
    """Whether the ordered workers run as one worker with N pool processes (else N workers)."""
    return layout == "pool" and pool == "prefork"


def _worker_command(variant: str, processes: int, pool: str, layout: str = "pool") -> list[str]:
    """The command of a variant's workers.

    Ordered workers, layout ``pool``: one worker with ``processes`` pool
    processes (``--concurrency``), like the plain workers; layout
    ``workers``: ``processes`` workers of one pool process each.
    """
    quiet = ["--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if variant == "ordered":
        if _one_pooled_worker(pool, layout):
            shape = ["--processes", "1", "--concurrency", str(processes)]
        else:
            shape = ["--processes", str(processes)]
        return [sys.executable, "-m", "django", "ordered_worker", *shape, "--pool", pool, "--", *quiet]
    base = [sys.executable, "-m", "celery", "-A", "bench_project.celery:app", "worker",
            "-c", str(processes), *quiet]
    if variant == "default":
        return [*base, "-Q", "bench.plain", "--prefetch-multiplier", "4"]
    if variant == "safe":
        return [*base, "-Q", "bench.plain", "--prefetch-multiplier", "1", "-O", "fair"]
    if variant == "solo":  # the strongest safe plain layout: no pool, no IPC, one message each
        workers = [shlex.join([sys.executable, "-m", "celery", "-A", "bench_project.celery:app", "worker",
                               "-P", "solo", "-n", f"solo{n}@%h", "-Q", "bench.plain",
                               "--prefetch-multiplier", "1", *quiet]) for n in range(processes)]
        return ["sh", "-c", " & ".join(workers) + " & wait"]
    return [*base, "-Q", "bench.locked", "--prefetch-multiplier", "1", "-O", "fair"]


def _task(variant: str) -> Any:
    from bench_project import tasks

    return {"default": tasks.plain_task, "safe": tasks.safe_task, "solo": tasks.safe_task,
            "lock": tasks.locked_task,
            "ordered": tasks.ordered_step}[variant]


def _purge(app: Any) -> None:
    from kombu import Queue

    from ordered_tasks.conf import get_settings
    from ordered_tasks.queues import partition_queue

    conf = get_settings()
    queues = [Queue("bench.plain"), Queue("bench.locked"),
              *(partition_queue(conf.queue_prefix, p) for p in range(conf.partitions))]
    with app.connection_for_write() as conn:
        for queue in queues:
            bound = queue(conn.default_channel)
            bound.declare()
            bound.purge()


def _publish(app: Any, task: Any, run: str, keys: int, per_key: int, rate: float | None = None) -> float:
    """Publish interleaved messages of ``keys`` keys; return the seconds it took."""
    order = [(f"k{k}", seq) for seq in range(1, per_key + 1) for k in range(keys)]
    random.Random(7).shuffle(order)
    # Keep each key's own sequence in order while interleaving keys.
    counters: dict[str, int] = defaultdict(int)
    messages = []
    for key, _ in order:
        counters[key] += 1
        messages.append((key, counters[key]))
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for n, (key, seq) in enumerate(messages):
            if rate:
                wait = started + n / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            task.apply_async(kwargs={"run": run, "key": key, "seq": seq, "published": time.time()},
                             producer=producer)
    return time.perf_counter() - started


def _records(results: Any, run: str) -> list[tuple[str, int, float, float]]:
    rows = []
    for raw in results.lrange(f"bench:{run}", 0, -1):
        key, seq, published, finished = raw.decode().split("|")
        rows.append((key, int(seq), float(published), float(finished)))
    return rows


def _wait(results: Any, run: str, total: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if results.llen(f"bench:{run}") >= total:
            return True
        time.sleep(0.05)
    return False


def _violations(rows: list[tuple[str, int, float, float]]) -> int:
    """Messages that finished before an earlier message of their key."""
    by_key: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for key, seq, _, finished in rows:
        by_key[key].append((finished, seq))
    count = 0
    for finishes in by_key.values():
        highest = 0
        for _, seq in sorted(finishes):
            if seq < highest:
                count += 1
            highest = max(highest, seq)
    return count


def _rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            with open(f"/proc/{current}/task/{current}/children") as children:
                todo.extend(int(child) for child in children.read().split())
        except (OSError, StopIteration):
            continue
    return total / 1024


def measure(app: Any, broker: str, variant: str, processes: int, tasks: int, keys: int,
            latency_rate: float, latency_seconds: float, pool: str = "prefork",
            layout: str = "pool") -> Result:
    """One variant: publish a backlog, start the workers, drain it, then a steady-state latency run.

    ``latency_seconds=0`` skips the latency run.
    """
    import redis
    from django.conf import settings

    results = redis.Redis.from_url(settings.BENCH_RESULTS_URL)
    result = Result(broker, variant, processes, tasks)
    task = _task(variant)
    _purge(app)
    run = uuid.uuid4().hex
    per_key = tasks // keys
    total = per_key * keys
    result.publish_per_s = total / _publish(app, task, run, keys, per_key)
    worker = subprocess.Popen(_worker_command(variant, processes, pool, layout), cwd=ROOT,
                              env=_env(app.conf.broker_url), stdout=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        if not _wait(results, run, total, timeout=300):
            result.notes.append(f"drain timed out with {results.llen(f'bench:{run}')} of {total}")
        rows = _records(results, run)
        if rows:
            starts = min(r[3] for r in rows)
            # From the first finished task to the last: worker start-up is not counted.
            span = max(r[3] for r in rows) - starts
            result.drain_per_s = (len(rows) - 1) / span if span > 0 else 0.0
        result.order_violations = _violations(rows)
        result.rss_mb = round(_rss_mb(worker.pid), 1)
        results.delete(f"bench:{run}")
        if latency_seconds <= 0:
            return result
        steady = uuid.uuid4().hex
        count = int(latency_rate * latency_seconds) // keys * keys
        _publish(app, task, steady, keys, count // keys, rate=latency_rate)
        _wait(results, steady, count, timeout=60)
        latencies = sorted((finished - published) * 1000
                           for _, _, published, finished in _records(results, steady))
        if latencies:
            result.latency_p50_ms = round(statistics.median(latencies), 1)
            result.latency_p99_ms = round(latencies[int(len(latencies) * 0.99) - 1], 1)
        results.delete(f"bench:{steady}")
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        result.publish_per_s = round(result.publish_per_s, 1)
        result.drain_per_s = round(result.drain_per_s, 1)
    return result


def combine(runs: list[Result]) -> Result:
    """The repetitions of one cell: median rates, the worst order, the first run's latency and memory."""
    combined = dataclasses.replace(runs[0], notes=[n for r in runs for n in r.notes])
    combined.drain_runs = [r.drain_per_s for r in runs]
    combined.drain_per_s = round(statistics.median(combined.drain_runs), 1)
    combined.publish_per_s = round(statistics.median(r.publish_per_s for r in runs), 1)
    combined.order_violations = max(r.order_violations for r in runs)
    return combined


def guard_overhead(app: Any, runs: int = 3000) -> dict[str, float]:
    """Microseconds per task the guard adds, run in-process through Celery's tracer."""
    from bench_project import tasks
    from celery.app.trace import trace_task

    from ordered_tasks import partition_for
    from ordered_tasks.conf import get_settings
    from ordered_tasks.queues import partition_queue
    from ordered_tasks.worker.failures.book import BOOK

    app.finalize(auto=True)
    figures: dict[str, float] = {}
    run = uuid.uuid4().hex
    for name, task in (("plain", tasks.plain_task), ("ordered", tasks.ordered_step)):
        task = app.tasks[task.name]
        key = "guard-key"
        started = time.perf_counter()
        for n in range(runs):
            request = {"id": str(uuid.uuid4()), "task": task.name, "retries": 0, "is_eager": False,
                       "hostname": "bench@host", "args": [], "ordered_key": key,
                       "ordered_partition": partition_for(key),
                       "ordered_content": ["application/json", "utf-8"],
                       "delivery_info": {"exchange": "", "redelivered": False, "priority": None,
                                         "routing_key": partition_queue(get_settings().queue_prefix,
                                                                        partition_for(key)).name}}
            kwargs = {"run": run, "key": key, "seq": n, "published": 0.0}
            request["kwargs"] = kwargs
            trace_task(task, request["id"], [], kwargs, request, app=app)
        figures[name] = (time.perf_counter() - started) / runs * 1e6
    BOOK.forget()
    tasks.results().delete(f"bench:{run}")
    figures["overhead"] = figures["ordered"] - figures["plain"]
    return {k: round(v, 1) for k, v in figures.items()}


def publish_cost(app: Any, rounds: int = 7, batch: int = 300) -> dict[str, float]:
    """Microseconds per ``apply_async``, plain against ordered, in alternating batches.

    The publish rates of the drain runs are measured minutes apart, and this
    machine's speed drifts between them; alternating short batches of the
    two in one loop compares them under the same conditions. Each figure is
    the median of ``rounds`` batches.
    """
    from bench_project import tasks

    _purge(app)
    run = uuid.uuid4().hex
    timings: dict[str, list[float]] = {"plain": [], "ordered": []}
    variants = [("plain", tasks.plain_task), ("ordered", tasks.ordered_step)]
    with app.producer_or_acquire() as producer:
        for task in (tasks.plain_task, tasks.ordered_step):  # warm up: connections, declarations
            for n in range(100):
                task.apply_async(kwargs={"run": run, "key": f"k{n}", "seq": 0, "published": 0.0},
                                 producer=producer)
        for round_ in range(rounds):
            for name, task in variants if round_ % 2 else variants[::-1]:
                started = time.perf_counter()
                for n in range(batch):
                    task.apply_async(kwargs={"run": run, "key": f"k{n % 100}", "seq": n,
                                             "published": 0.0}, producer=producer)
                timings[name].append((time.perf_counter() - started) / batch * 1e6)
    _purge(app)
    figures = {name: statistics.median(values) for name, values in timings.items()}
    figures["ratio"] = figures["plain"] / figures["ordered"]
    return {k: round(v, 2 if k == "ratio" else 1) for k, v in figures.items()}


def table(results: list[Result]) -> str:
    """The results as a Markdown table."""
    lines = ["| broker | variant | processes | publish/s | drain/s | p50 ms | p99 ms | "
             "order violations | RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.broker} | {r.variant} | {r.processes} | {r.publish_per_s:.0f} | "
                     f"{r.drain_per_s:.0f} | {r.latency_p50_ms:.1f} | {r.latency_p99_ms:.1f} | "
                     f"{r.order_violations} | {r.rss_mb:.0f} |")
    return "\n".join(lines)


def _ratio(results: list[Result], r: Result, variant: str) -> str:
    base = next((b.drain_per_s for b in results
                 if (b.broker, b.variant, b.processes) == (r.broker, variant, r.processes)), 0.0)
    return f"{r.drain_per_s / base:.2f}x" if base else "-"


def rst_table(results: list[Result], overhead: dict[str, float], publish: dict[str, dict[str, float]],
              repeat: int, pool: str, layout: str = "pool") -> str:
    """The results as the reStructuredText the benchmarks page includes."""
    header = ["broker", "variant", "procs", "publish/s", "drain/s", "vs default", "vs safe", "vs solo",
              "p50 ms", "p99 ms", "order violations", "RSS MB"]
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 9 9 5 8 8 8 8 8 6 6 9 6", ""]
    rows = [header] + [[r.broker, r.variant, str(r.processes), f"{r.publish_per_s:.0f}",
                        f"{r.drain_per_s:.0f}", _ratio(results, r, "default"), _ratio(results, r, "safe"),
                        _ratio(results, r, "solo"),
                        f"{r.latency_p50_ms:.1f}", f"{r.latency_p99_ms:.1f}", str(r.order_violations),
                        f"{r.rss_mb:.0f}"] for r in results]
    for row in rows:
        lines += [f"   * - {row[0]}", *(f"     - {cell}" for cell in row[1:])]
    if _one_pooled_worker(pool, layout):
        shape = ("one worker whose pool has as many processes as the plain workers' "
                 "(``ordered_worker --processes 1 --concurrency N``)")
    else:
        shape = "as many workers as the plain workers have pool processes (``ordered_worker --processes N``)"
    lines += ["", f"Drain rates are the median of {repeat} runs. Ordered: {shape}, ``{pool}`` pool.",
              "", f"The guard, in-process: a plain task took {overhead['plain']:.0f} µs, an ordered "
              f"task {overhead['ordered']:.0f} µs, so the guard costs about "
              f"**{overhead['overhead']:.0f} µs per task**."]
    for broker, cost in sorted(publish.items()):
        lines += ["", f"Publishing on {broker}, alternating batches: plain {cost['plain']:.0f} µs, "
                  f"ordered {cost['ordered']:.0f} µs per message (ordered/plain rate "
                  f"**{cost['ratio']:.2f}x**)."]
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> bool:
    """Drain throughput per variant and process count, one panel per broker (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    brokers = sorted({r.broker for r in results})
    fig, axes = plt.subplots(1, len(brokers), figsize=(6 * len(brokers), 4.4), squeeze=False)
    for ax, broker in zip(axes[0], brokers, strict=True):
        counts = sorted({r.processes for r in results if r.broker == broker})
        width = 0.8 / len(VARIANTS)
        for i, variant in enumerate(VARIANTS):
            values = [next((r.drain_per_s for r in results if (r.broker, r.variant, r.processes)
                            == (broker, variant, n)), 0.0) for n in counts]
            offset = i - (len(VARIANTS) - 1) / 2
            ax.bar([c + offset * width for c in range(len(counts))], values, width, label=LABELS[variant])
        ax.set_xticks(range(len(counts)), [f"{n} process{'es' if n > 1 else ''}" for n in counts])
        ax.set_title(f"Drain throughput on {broker} (tasks/s)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def _one_broker(args: argparse.Namespace) -> int:
    app = _setup(BROKERS[args.one_broker])
    overhead = guard_overhead(app)
    publish = publish_cost(app)
    print(json.dumps({"publish_us": publish}), flush=True)
    runs: dict[tuple[int, str], list[Result]] = defaultdict(list)
    for repetition in range(args.repeat):  # outermost, so that drift spreads over all variants
        for processes in args.processes:
            for variant in args.variants:
                result = measure(app, args.one_broker, variant, processes, args.tasks, args.keys,
                                 args.latency_rate, args.latency_seconds if repetition == 0 else 0.0,
                                 args.ordered_pool, args.ordered_layout)
                print(json.dumps(asdict(result)), flush=True)
                runs[processes, variant].append(result)
    results = [combine(cell) for cell in runs.values()]
    args.output.write_text(json.dumps({"results": [asdict(r) for r in results], "guard_us": overhead,
                                       "publish_us": publish}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks chosen on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brokers", nargs="+", choices=sorted(BROKERS), default=sorted(BROKERS))
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--latency-rate", type=float, default=200.0, help="tasks/s of the latency run")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3,
                        help="drain runs per cell; the table shows their median (latency: first run)")
    parser.add_argument("--ordered-pool", choices=("prefork", "threads", "solo"), default="prefork",
                        help="pool of the ordered workers")
    parser.add_argument("--ordered-layout", choices=("pool", "workers"), default="pool",
                        help="ordered workers with N processes: one worker with N pool processes "
                             "(prefork only), or N workers of one process each")
    parser.add_argument("--quick", action="store_true", help="Redis, 2 processes, 1,000 tasks")
    parser.add_argument("--output", type=Path, default=HERE / "results.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "_static" / "benchmarks.png")
    parser.add_argument("--rst", type=Path, default=ROOT / "docs" / "benchmarks_results.inc",
                        help="the table the benchmarks page includes")
    parser.add_argument("--one-broker", choices=sorted(BROKERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_broker:
        return _one_broker(args)
    if args.quick:
        args.brokers, args.processes, args.tasks, args.repeat = ["redis"], [2], 1000, 1
    results: list[Result] = []
    overhead: dict[str, float] = {}
    publish: dict[str, dict[str, float]] = {}
    for broker in args.brokers:
        # Django reads the broker once per process: one process per broker.
        part = args.output.with_suffix(f".{broker}.json")
        command = [sys.executable, __file__, "--one-broker", broker, "--output", str(part),
                   "--processes", *map(str, args.processes), "--variants", *args.variants,
                   "--tasks", str(args.tasks), "--keys", str(args.keys),
                   "--latency-rate", str(args.latency_rate), "--latency-seconds", str(args.latency_seconds),
                   "--repeat", str(args.repeat), "--ordered-pool", args.ordered_pool,
                   "--ordered-layout", args.ordered_layout]
        subprocess.run(command, check=True)
        data = json.loads(part.read_text())
        part.unlink()
        results += [Result(**row) for row in data["results"]]
        overhead = overhead or data["guard_us"]
        publish[broker] = data["publish_us"]
    print()
    print(table(results))
    print(f"\nguard, in-process per task: plain {overhead['plain']} µs, ordered {overhead['ordered']} µs, "
          f"overhead {overhead['overhead']} µs")
    for broker, cost in publish.items():
        print(f"publish on {broker}, alternating batches: plain {cost['plain']} µs, "
              f"ordered {cost['ordered']} µs per message, ordered/plain rate {cost['ratio']}x")
    args.output.write_text(json.dumps({"results": [asdict(r) for r in results], "guard_us": overhead,
                                       "publish_us": publish, "ordered_pool": args.ordered_pool,
                                       "ordered_layout": args.ordered_layout,
                                       "machine": {"cpus": os.cpu_count()}},
                                      indent=2) + "\n")
    args.rst.write_text(rst_table(results, overhead, publish, args.repeat, args.ordered_pool,
                                  args.ordered_layout))
    if plot(results, args.plot):
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
