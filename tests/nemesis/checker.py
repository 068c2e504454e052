"""Rules over a run's history: nothing lost, per-key order, no overlap, bounded duplicates and idleness."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ordered_tasks.partitioning import partition_of
from tests.nemesis.history import Execution, Fault, History, MessageId

#: Seconds a partition may hold waiting messages without any progress (outside fault windows).
IDLE_BOUND = 30.0
#: Seconds after a fault is undone during which its partitions may still be idle (lease, restart).
FAULT_GRACE = 20.0


@dataclass(frozen=True)
class Violation:
    """One broken rule, with what shows it."""

    rule: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.detail}"


def precedes(a: MessageId, b: MessageId) -> bool:
    """Whether message ``a`` of a key must start before message ``b`` of the same key.

    A head (link 0) precedes every message of a later sequence number; a chain's
    link precedes its later links. A later link of a chain is published by a
    worker when the link before it ends, so messages published meanwhile may run
    before it.
    """
    (_, seq_a, link_a), (_, seq_b, link_b) = a, b
    return (seq_a < seq_b and link_a == 0) or (seq_a == seq_b and link_a < link_b)


def expected_messages(history: History) -> dict[MessageId, str]:
    """Every message that should exist: published heads, and each chain link whose predecessor succeeded."""
    expected = {p.message: p.task_id for p in history.publishes}
    succeeded = {ex.message for ex in history.executions if ex.outcome == "ok"}
    for p in history.publishes:
        for link in range(1, p.links):
            if (p.key, p.seq, link - 1) in succeeded:
                expected[(p.key, p.seq, link)] = ""
    return expected


def check_lost(history: History) -> list[Violation]:
    """Every message ran to the end, or has a ParkedMessage row (parked, skipped, revoked).

    A message that did not, in a partition whose queue is not empty at the end,
    is reported as ``not-run`` rather than ``lost``: it may still be waiting.
    """
    ran = {ex.message for ex in history.executions if ex.outcome == "ok"}
    row_ids = {r.task_id for r in history.rows} | {r.message for r in history.rows if r.message}
    revoked = {p.message for p in history.publishes if p.revoked}
    lost = []
    for message, task_id in sorted(expected_messages(history).items()):
        if message not in ran and message not in row_ids and task_id not in row_ids:
            why = " (revoked)" if message in revoked else ""
            waiting = history.final_depths.get(partition_of(message[0], history.partitions), 0)
            if waiting:  # probably one of them: the drain rule reports the stall
                lost.append(Violation("not-run", f"{_name(message)} [{task_id}]{why} did not run; its "
                                                 f"partition still has {waiting} waiting message(s)"))
            else:
                lost.append(Violation("lost", f"{_name(message)} [{task_id}]{why} neither ran nor was "
                                              f"parked, and its partition's queue is empty"))
    return lost


def _first_starts(executions: Iterable[Execution]) -> dict[MessageId, float]:
    first: dict[MessageId, float] = {}
    for ex in executions:
        first[ex.message] = min(first.get(ex.message, ex.start), ex.start)
    return first


def check_order(history: History) -> list[Violation]:
    """Per key, first runs follow publish order, and no rerun starts after a later message started."""
    violations, t0 = [], history.t0
    by_key: dict[str, list[Execution]] = defaultdict(list)
    for ex in history.executions:
        by_key[ex.key].append(ex)
    for key, executions in sorted(by_key.items()):
        first = _first_starts(executions)
        for a, b in itertools.permutations(first, 2):
            if precedes(a, b) and first[b] < first[a]:
                violations.append(Violation("order", f"key {key}: {_name(b)} first ran at {first[b] - t0:.3f}, "
                                                     f"before {_name(a)} at {first[a] - t0:.3f}"))
        for ex in executions:
            for b, started in first.items():
                if precedes(ex.message, b) and first[ex.message] < started < ex.start:
                    violations.append(Violation(
                        "late-rerun", f"key {key}: {_name(ex.message)} ran again at {ex.start - t0:.3f} "
                                      f"(pid {ex.pid}) after {_name(b)} started at {started - t0:.3f}"))
    return violations


def _frozen_while_running(faults: Sequence[Fault], running: Execution, later: Execution) -> bool:
    """Whether ``running``'s worker was frozen past its lease while it ran, before ``later`` started.

    The documented stale-owner window: a task body already running when its
    worker froze is not interrupted, and finishes after the partition's new
    owner started the message (or a later one) again.
    """
    end = running.end if running.end is not None else later.start
    return any(f.kind == "stop_past_lease" and running.start <= f.start <= end and f.start <= later.start
               for f in faults)


def _overlaps(groups: dict[object, list[Execution]], rule: str, t0: float,
              faults: Sequence[Fault] = ()) -> list[Violation]:
    violations = []
    for group, executions in sorted(groups.items(), key=lambda item: str(item[0])):
        ended = sorted((ex for ex in executions if ex.end is not None), key=lambda ex: ex.start)
        latest: Execution | None = None
        for ex in ended:
            if (latest is not None and latest.end is not None and ex.start < latest.end
                    and not _frozen_while_running(faults, latest, ex)):
                violations.append(Violation(rule, f"{group}: {_name(ex.message)} (pid {ex.pid}) started at "
                                                  f"{ex.start - t0:.3f} while {_name(latest.message)} (pid "
                                                  f"{latest.pid}) ran until {latest.end - t0:.3f}"))
            if latest is None or (ex.end or 0) > (latest.end or 0):
                latest = ex
    return violations


def check_overlap(history: History) -> list[Violation]:
    """No two executions of one key run at the same time (keys of one partition may)."""
    by_key: dict[object, list[Execution]] = defaultdict(list)
    for ex in history.executions:
        by_key[f"key {ex.key}"].append(ex)
    return _overlaps(by_key, "overlap", history.t0, history.faults)


def check_duplicates(history: History) -> list[Violation]:
    """Runs that did not fail on purpose, beyond one per message, are at most one per kill or stop."""
    runs: dict[MessageId, int] = defaultdict(int)
    for ex in history.executions:
        if ex.outcome != "fail":
            runs[ex.message] += 1
    repeated = {m: n - 1 for m, n in runs.items() if n > 1}
    allowed = sum(f.duplicates_allowed for f in history.faults)
    if sum(repeated.values()) <= allowed:
        return []
    listing = ", ".join(f"{_name(m)} x{n + 1}" for m, n in sorted(repeated.items()))
    return [Violation("duplicates", f"{sum(repeated.values())} repeated runs, {allowed} allowed by the "
                                    f"kills and stops: {listing}")]


def _excused(history: History, start: float, end: float) -> float:
    """Seconds of [start, end] covered by a fault window (merged)."""
    windows = sorted((f.start, f.end + FAULT_GRACE) for f in history.faults)
    covered, cursor = 0.0, start
    for low, high in windows:
        low, high = max(low, cursor), min(high, end)
        if high > low:
            covered += high - low
            cursor = high
    return covered


def check_idle(history: History, bound: float = IDLE_BOUND) -> list[Violation]:
    """No partition keeps waiting messages without progress for longer than ``bound`` seconds.

    Progress is an execution starting or ending, or the queue getting shorter (a
    message parked); a queue that only grows (publishes, replay requests) is stalled.
    """
    events: dict[int, list[float]] = defaultdict(list)
    busy: dict[int, list[tuple[float, float]]] = defaultdict(list)
    # A worker with one pool process runs one task at a time for all its partitions: while
    # a pool process runs a task, every partition it ran during the run counts as busy.
    served: dict[int, set[int]] = defaultdict(set)
    for ex in history.executions:
        served[ex.pid].add(partition_of(ex.key, history.partitions))
    for ex in history.executions:
        p = partition_of(ex.key, history.partitions)
        events[p] += [ex.start, ex.busy_until()]
        for partition in served[ex.pid]:
            busy[partition].append((ex.start, ex.busy_until()))
    violations = []
    for p in range(history.partitions):
        since: float | None = None
        previous = None
        reported = False
        for sample in history.samples:
            depth = sample.depths.get(p, 0)
            if depth == 0:
                since, reported = None, False
            elif since is None or previous is None or depth < previous.depths.get(p, 0) or any(
                    previous.t < t <= sample.t for t in events[p]) or any(
                    s < sample.t and e > previous.t for s, e in busy[p]):
                since, reported = sample.t, False
            elif not reported and sample.t - since - _excused(history, since, sample.t) > bound:
                violations.append(Violation("idle", f"partition {p}: {depth} message(s) waited without "
                                                    f"progress from {since - history.t0:.3f} to "
                                                    f"{sample.t - history.t0:.3f}"))
                reported = True
            previous = sample
    return violations


def check_drained(history: History) -> list[Violation]:
    """After healing, every queue is empty and no message is still parked."""
    violations = [Violation("drain", f"partition {p}: {n} message(s) still waiting at the end")
                  for p, n in sorted(history.final_depths.items()) if n]
    stuck = [r for r in history.rows if r.state == "parked"]
    if stuck:
        violations.append(Violation("drain", f"{len(stuck)} message(s) still parked at the end: " + ", ".join(
            _name(r.message) if r.message else r.task_id for r in stuck[:10])))
    return violations


RULES = (check_lost, check_order, check_overlap, check_duplicates, check_idle, check_drained)


def check(history: History) -> list[Violation]:
    """Every rule's violations."""
    return [v for rule in RULES for v in rule(history)]


def _name(message: MessageId | None) -> str:
    if message is None:
        return "?"
    key, seq, link = message
    return f"{key}#{seq}" + (f".{link}" if link else "")
