"""Benchmarks of the per-key window: I/O-bound tasks, window sizes and a hot key, against plain Celery.

Run from the repository root (Redis, RabbitMQ and PostgreSQL on localhost)::

    pip install -e ".[bench]"
    python benchmarks/window.py              # both brokers, every cell
    python benchmarks/window.py --quick      # Redis only, fewer tasks

Cells, each on both brokers, 16 partitions:

* ``io``: tasks that wait 20 ms (a database or another service), one
  worker with the same pool and concurrency for plain Celery (its default
  worker: early acknowledgement, prefetch 4) and ordered_tasks
  (``ordered_worker --processes 1``): threads x 32 and prefork x 8. Drain
  rate, memory of the worker, and publish-to-finish latency at a steady
  half of plain Celery's drain rate.
* ``window``: the ordered threads x 32 worker on the same I/O-bound tasks,
  and a prefork x 2 worker on trivial tasks, with ``WINDOW`` 1, 4, 16 and 64.
* ``hot``: threads x 32, I/O-bound; the same messages of 300 keys, alone
  and with as many messages again of one hot key interleaved (half of all
  traffic): the drain rate of the other keys' messages in both runs.

It prints one JSON line per run and writes ``benchmarks/window_results.json``,
``docs/benchmarks_window.inc`` and (with matplotlib)
``docs/_static/benchmarks_window.png``. Variants of a cell run one after the
other in one invocation: compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
sys.path[:0] = [str(HERE), str(ROOT)]

import run as base  # noqa: E402  (the drain benchmark's helpers)

PARTITIONS = 16
IO_SLEEP = 0.02
HOT = "hot"


@dataclass
class Run:
    """One drain of one variant."""

    cell: str
    broker: str
    variant: str
    pool: str
    concurrency: int
    window: int
    sleep: float
    tasks: int
    drain_per_s: float = 0.0
    #: The drain rate of the messages of keys other than the hot one.
    others_per_s: float = 0.0
    rss_mb: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    order_violations: int = 0
    notes: list[str] = field(default_factory=list)


def command(variant: str, pool: str, concurrency: int) -> list[str]:
    """One worker process, plain Celery's default worker or an ordered one, ``pool`` x ``concurrency``."""
    quiet = ["--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if variant == "ordered":
        return [sys.executable, "-m", "django", "ordered_worker", "--processes", "1", "--pool", pool,
                "--concurrency", str(concurrency), "--", *quiet]
    return [sys.executable, "-m", "celery", "-A", "bench_project.celery:app", "worker", "-Q", "bench.plain",
            "-P", pool, "-c", str(concurrency), "--prefetch-multiplier", "4", *quiet]


def messages(keys: int, per_key: int, hot: int, seed: int = 7) -> list[tuple[str, int]]:
    """``per_key`` messages of each of ``keys`` keys and ``hot`` of the hot key, interleaved."""
    names = [f"k{k}" for k in range(keys) for _ in range(per_key)] + [HOT] * hot
    random.Random(seed).shuffle(names)
    counters: dict[str, int] = defaultdict(int)
    out = []
    for name in names:
        counters[name] += 1
        out.append((name, counters[name]))
    return out


def publish(app: Any, task: Any, run: str, batch: list[tuple[str, int]], sleep: float,
            rate: float | None = None) -> None:
    """Publish ``batch`` in its order (at ``rate`` per second if given), each task waiting ``sleep`` s."""
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for n, (key, seq) in enumerate(batch):
            if rate:
                wait = started + n / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            task.apply_async(kwargs={"run": run, "key": key, "seq": seq, "published": time.time(),
                                     "sleep": sleep}, producer=producer)


def rate_of(finishes: list[float]) -> float:
    """Messages per second from the first finish to the last (worker start-up is not counted)."""
    if len(finishes) < 2:
        return 0.0
    span = max(finishes) - min(finishes)
    return (len(finishes) - 1) / span if span > 0 else 0.0


def worker_rss_mb(pid: int, variant: str) -> float:
    """Resident memory of the worker process and its pool (not ``ordered_worker``'s supervisor)."""
    if variant != "ordered":
        return base._rss_mb(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return sum(base._rss_mb(int(child)) for child in children.read().split())
    except OSError:
        return 0.0


def drain(app: Any, result: Run, keys: int, hot: int, latency_rate: float = 0.0,
          latency_seconds: float = 0.0) -> Run:
    """Publish a backlog, start the worker, drain it; optionally a steady-state latency run after."""
    import redis
    from django.conf import settings

    results = redis.Redis.from_url(settings.BENCH_RESULTS_URL)
    task = base._task("ordered" if result.variant == "ordered" else "default")
    base._purge(app)
    run = uuid.uuid4().hex
    batch = messages(keys, (result.tasks - hot) // keys, hot)
    result.tasks = len(batch)
    publish(app, task, run, batch, result.sleep)
    env = {**base._env(app.conf.broker_url), "BENCH_WINDOW": str(result.window),
           "BENCH_PARTITIONS": str(PARTITIONS)}
    worker = subprocess.Popen(command(result.variant, result.pool, result.concurrency), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        if not base._wait(results, run, result.tasks, timeout=600):
            result.notes.append(f"drain timed out with {results.llen(f'bench:{run}')} of {result.tasks}")
        rows = base._records(results, run)
        result.drain_per_s = round(rate_of([r[3] for r in rows]), 1)
        result.others_per_s = round(rate_of([r[3] for r in rows if r[0] != HOT]), 1)
        result.order_violations = base._violations(rows) if result.variant == "ordered" else 0
        result.rss_mb = round(worker_rss_mb(worker.pid, result.variant), 1)
        results.delete(f"bench:{run}")
        if latency_rate > 0 and latency_seconds > 0:
            steady = uuid.uuid4().hex
            count = int(latency_rate * latency_seconds) // keys * keys
            publish(app, task, steady, messages(keys, count // keys, 0), result.sleep, rate=latency_rate)
            base._wait(results, steady, count, timeout=120)
            latencies = sorted((finished - published) * 1000
                               for _, _, published, finished in base._records(results, steady))
            if latencies:
                result.latency_p50_ms = round(statistics.median(latencies), 1)
                result.latency_p99_ms = round(latencies[max(0, int(len(latencies) * 0.99) - 1)], 1)
            results.delete(f"bench:{steady}")
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    print(json.dumps(asdict(result)), flush=True)
    return result


#: The groups of cells ``--cells`` chooses from.
CELLS = ("io", "window", "hot")


def one_broker(broker: str, quick: bool, cells: tuple[str, ...] = CELLS) -> list[Run]:
    """The chosen cells on one broker (Django reads the broker once per process)."""
    os.environ["BENCH_PARTITIONS"] = str(PARTITIONS)
    app = base._setup(base.BROKERS[broker])
    scale = 0.4 if quick else 1.0
    runs: list[Run] = []
    for pool, concurrency, tasks in (("threads", 32, 4000), ("prefork", 8, 1600)) if "io" in cells else ():
        n = int(tasks * scale)
        plain = drain(app, Run("io", broker, "plain", pool, concurrency, 16, IO_SLEEP, n), keys=300, hot=0)
        half = plain.drain_per_s / 2
        runs.append(plain)
        runs.append(drain(app, Run("io", broker, "ordered", pool, concurrency, 16, IO_SLEEP, n), keys=300,
                          hot=0))
        for variant in ("plain", "ordered"):  # latency at a steady half of plain Celery's drain rate
            # The backlog of 300 first: the worker is up when the steady publishing starts.
            steady = drain(app, Run("latency", broker, variant, pool, concurrency, 16, IO_SLEEP,
                                    300), keys=100, hot=0, latency_rate=half,
                           latency_seconds=10 * scale)
            runs.append(steady)
    for window in (1, 4, 16, 64) if "window" in cells else ():
        runs.append(drain(app, Run("window-io", broker, "ordered", "threads", 32, window, IO_SLEEP,
                                   int(3000 * scale)), keys=300, hot=0))
        runs.append(drain(app, Run("window-trivial", broker, "ordered", "prefork", 2, window, 0.0,
                                   int(4000 * scale)), keys=300, hot=0))
    others = int(2000 * scale)
    # The hot key's waiting messages are parked in batches of half a window: WINDOW 64 shows that lever.
    for variant, window in (("plain", 16), ("ordered", 16), ("ordered", 64)) if "hot" in cells else ():
        for hot in (0, others):
            cell = "hot" if hot else "no-hot"
            runs.append(drain(app, Run(cell, broker, variant, "threads", 32, window, IO_SLEEP, others + hot),
                              keys=300, hot=hot))
    return runs


def _find(runs: list[Run], **match: Any) -> Run | None:
    return next((r for r in runs if all(getattr(r, k) == v for k, v in match.items())), None)


def _ratio(top: Run | None, bottom: Run | None, attr: str = "drain_per_s") -> str:
    if top is None or bottom is None or not getattr(bottom, attr):
        return "-"
    return f"{getattr(top, attr) / getattr(bottom, attr):.2f}x"


def _list_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        lines += [f"   * - {row[0]}", *(f"     - {cell}" for cell in row[1:])]
    return [*lines, ""]


def rst(runs: list[Run]) -> str:
    """The tables the benchmarks page includes."""
    brokers = sorted({r.broker for r in runs})
    rows = []
    for broker in brokers:
        for pool, concurrency in (("threads", 32), ("prefork", 8)):
            plain = _find(runs, cell="io", broker=broker, variant="plain", pool=pool)
            ordered = _find(runs, cell="io", broker=broker, variant="ordered", pool=pool)
            lat_plain = _find(runs, cell="latency", broker=broker, variant="plain", pool=pool)
            lat_ordered = _find(runs, cell="latency", broker=broker, variant="ordered", pool=pool)
            if plain is None or ordered is None:
                continue
            rows.append([broker, f"{pool} x {concurrency}", f"{plain.drain_per_s:.0f}",
                         f"{ordered.drain_per_s:.0f}",
                         f"**{_ratio(ordered, plain)}**", f"{plain.rss_mb:.0f} / {ordered.rss_mb:.0f}",
                         f"{lat_plain.latency_p50_ms if lat_plain else 0:.0f} / "
                         f"{lat_ordered.latency_p50_ms if lat_ordered else 0:.0f}",
                         f"{lat_plain.latency_p99_ms if lat_plain else 0:.0f} / "
                         f"{lat_ordered.latency_p99_ms if lat_ordered else 0:.0f}",
                         str(ordered.order_violations)])
    lines = _list_table(["broker", "pool", "plain tasks/s", "ordered tasks/s", "ordered / plain",
                         "RSS MB plain / ordered", "p50 ms plain / ordered", "p99 ms plain / ordered",
                         "order violations"], rows)
    rows = []
    for broker in brokers:
        for window in (1, 4, 16, 64):
            io = _find(runs, cell="window-io", broker=broker, window=window)
            trivial = _find(runs, cell="window-trivial", broker=broker, window=window)
            rows.append([broker, str(window), f"{io.drain_per_s:.0f}" if io else "-",
                         f"{trivial.drain_per_s:.0f}" if trivial else "-"])
    lines += _list_table(["broker", "WINDOW", "I/O-bound, threads x 32 (tasks/s)",
                          "trivial, prefork x 2 (tasks/s)"], rows)
    rows = []
    for broker in brokers:
        for variant, window in (("plain", 16), ("ordered", 16), ("ordered", 64)):
            alone = _find(runs, cell="no-hot", broker=broker, variant=variant, window=window)
            hot = _find(runs, cell="hot", broker=broker, variant=variant, window=window)
            if alone is None or hot is None:
                continue
            rows.append([broker, f"{variant}, WINDOW {window}" if variant == "ordered" else variant,
                         f"{alone.others_per_s:.0f}", f"{hot.others_per_s:.0f}",
                         f"**{_ratio(hot, alone, 'others_per_s')}**"])
    lines += _list_table(["broker", "variant", "other keys alone (tasks/s)",
                          "other keys beside a hot key (tasks/s)", "beside / alone"], rows)
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> bool:
    """I/O-bound drain rates, plain against ordered, and ordered per window (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    brokers = sorted({r.broker for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    cells = [(b, pool) for b in brokers for pool in ("threads", "prefork")]
    for i, variant in enumerate(("plain", "ordered")):
        found = [_find(runs, cell="io", broker=b, variant=variant, pool=pool) for b, pool in cells]
        values = [r.drain_per_s if r else 0.0 for r in found]
        axes[0].bar([c + (i - 0.5) * 0.4 for c in range(len(cells))], values, 0.4,
                    label="plain Celery" if variant == "plain" else "ordered_tasks")
    axes[0].set_xticks(range(len(cells)), [f"{b}\n{'threads x 32' if p == 'threads' else 'prefork x 8'}"
                                           for b, p in cells])
    axes[0].set_title("Tasks that wait 20 ms: drain (tasks/s)")
    axes[0].legend(fontsize=8)
    for broker in brokers:
        for cell, style in (("window-io", "-o"), ("window-trivial", "--s")):
            points = [(r.window, r.drain_per_s) for r in runs if r.cell == cell and r.broker == broker]
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                what = "I/O-bound threads x 32" if cell == "window-io" else "trivial prefork x 2"
                axes[1].plot(xs, ys, style, label=f"{broker}, {what}")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("ORDERED_TASKS['WINDOW']")
    axes[1].set_title("Ordered drain by window (tasks/s)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run every cell on the chosen brokers, one process per broker."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--brokers", nargs="+", choices=sorted(base.BROKERS), default=sorted(base.BROKERS))
    parser.add_argument("--quick", action="store_true", help="Redis only, fewer tasks")
    parser.add_argument("--output", type=Path, default=HERE / "window_results.json")
    parser.add_argument("--rst", type=Path, default=ROOT / "docs" / "benchmarks_window.inc")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "_static" / "benchmarks_window.png")
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS),
                        help="run only these cells; the others keep their figures from --output")
    parser.add_argument("--one-broker", choices=sorted(base.BROKERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cells = tuple(args.cells)
    if args.one_broker:
        runs = one_broker(args.one_broker, args.quick, cells)
        args.output.write_text(json.dumps([asdict(r) for r in runs]))
        return 0
    brokers = ["redis"] if args.quick else args.brokers
    runs: list[Run] = []
    for broker in brokers:
        part = args.output.with_suffix(f".{broker}.json")
        subprocess.run([sys.executable, __file__, "--one-broker", broker, "--output", str(part),
                        "--cells", *cells, *(["--quick"] if args.quick else [])], check=True)
        runs += [Run(**row) for row in json.loads(part.read_text())]
        part.unlink()
    if set(cells) != set(CELLS) and args.output.exists():  # keep the figures of the cells not run
        ran_now = {(r.cell, r.broker) for r in runs}
        kept = [Run(**row) for row in json.loads(args.output.read_text())["runs"]]
        runs = [r for r in kept if (r.cell, r.broker) not in ran_now] + runs
    args.output.write_text(json.dumps({"runs": [asdict(r) for r in runs], "quick": args.quick,
                                       "machine": {"cpus": os.cpu_count()}}, indent=2) + "\n")
    args.rst.write_text(rst(runs))
    print(rst(runs))
    if plot(runs, args.plot):
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
