"""Worker launch options: partition selection and Celery flags that break ordering."""

from __future__ import annotations

import importlib.util
from typing import Sequence

from ...exceptions import UnsafeWorkerOptionError

#: The Celery pools an ordered worker runs (gevent when it is installed).
POOLS = ("prefork", "threads", "solo", "gevent")

#: Celery worker flags the launcher sets itself or refuses, and why.
FORBIDDEN_FLAGS: dict[str, str] = {
    "-c": "use the launcher's own --concurrency option (pool processes per worker)",
    "--concurrency": "use the launcher's own --concurrency option (pool processes per worker)",
    "--autoscale": "use --processes and --concurrency; a resized pool would change the prefetch",
    "--prefetch-multiplier": "a prefetched message can be overtaken; the launcher sets 1",
    "-Q": "the launcher chooses the partition queues; use --partitions",
    "--queues": "the launcher chooses the partition queues; use --partitions",
    "-X": "the launcher chooses the partition queues; use --partitions",
    "--exclude-queues": "the launcher chooses the partition queues; use --partitions",
    "-P": "use the launcher's own --pool option (prefork, threads, solo or gevent)",
    "--pool": "use the launcher's own --pool option (prefork, threads, solo or gevent)",
    "-B": "run celery beat as its own process",
    "--beat": "run celery beat as its own process",
    "-O": "the launcher sets the scheduling of its workers' pools",
    "-D": "the launcher supervises its workers; run it under systemd instead of detaching",
    "--detach": "the launcher supervises its workers; run it under systemd instead of detaching",
    "--purge": "purging deletes waiting ordered tasks without a record; use manage.py ordered_purge",
    "--discard": "purging deletes waiting ordered tasks without a record; use manage.py ordered_purge",
    "-A": "give the app with --app or ORDERED_TASKS['CELERY_APP']",
    "--app": "give the app with --app or ORDERED_TASKS['CELERY_APP']",
    "-n": "use the launcher's own --hostname option",
    "--hostname": "use the launcher's own --hostname option",
    "--pidfile": "each worker process would fight over one pid file; let systemd track the launcher",
    "--statedb": "each worker process would fight over one state file",
}


def check_celery_args(args: Sequence[str]) -> None:
    """Refuse Celery worker flags that would break ordering or supervision."""
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
        elif arg.startswith("-") and len(arg) > 1:
            flag = arg[:2]
        else:
            continue
        if flag in FORBIDDEN_FLAGS:
            raise UnsafeWorkerOptionError(
                f"ordered_worker does not accept the Celery option {flag}: "
                f"{FORBIDDEN_FLAGS[flag]}."
            )


def check_concurrency(concurrency: int, pool: str) -> None:
    """Refuse a pool size ordered workers cannot run safely."""
    if concurrency < 1:
        raise UnsafeWorkerOptionError("--concurrency must be at least 1.")
    if concurrency > 1 and pool == "solo":
        raise UnsafeWorkerOptionError(
            f"--concurrency {concurrency} needs a pool: --pool solo runs one task at a time. "
            "Use --pool threads (or prefork, or gevent), or --processes to add workers."
        )
    if pool == "gevent" and importlib.util.find_spec("gevent") is None:
        raise UnsafeWorkerOptionError("--pool gevent needs gevent: pip install gevent.")


def parse_partitions(spec: str | None, total: int) -> list[int]:
    """Parse ``"0-7,12"`` into sorted partition numbers below ``total`` (None: all)."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(total))
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise UnsafeWorkerOptionError(
                f"--partitions {spec!r}: {part!r} is not a number or a range like 0-7."
            )
        first, last = int(low), int(high) if sep else int(low)
        if first > last or last >= total:
            raise UnsafeWorkerOptionError(
                f"--partitions {spec!r}: {part!r} is outside 0-{total - 1} "
                f"(ORDERED_TASKS['PARTITIONS'] is {total})."
            )
        chosen.update(range(first, last + 1))
    return sorted(chosen)


def split_partitions(partitions: Sequence[int], processes: int) -> list[list[int]]:
    """Deal partitions round-robin over ``processes`` workers (none left empty)."""
    if processes < 1:
        raise UnsafeWorkerOptionError("--processes must be at least 1.")
    if processes > len(partitions):
        raise UnsafeWorkerOptionError(
            f"--processes {processes} is more than the {len(partitions)} partitions "
            "chosen; a worker without a partition would sit idle. Lower --processes "
            "or raise ORDERED_TASKS['PARTITIONS']."
        )
    return [list(partitions[i::processes]) for i in range(processes)]


def child_hostname(base: str, index: int) -> str:
    """Node name of worker ``index``: ``ordered@%h`` becomes ``ordered-0@%h``."""
    name, sep, host = base.partition("@")
    return f"{name}-{index}{sep}{host}" if sep else f"{name}-{index}@%h"
