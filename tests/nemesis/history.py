"""What happened in a run: publishes, executions, faults, queue samples and parked rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MessageId = tuple[str, int, int]  # key, sequence number of the key, link in its chain (0: the head)


@dataclass(frozen=True)
class Publish:
    """One message the test process published (a chain's later links are published by workers)."""

    key: str
    seq: int
    task_id: str
    t: float
    kind: str = "task"  # task, chain, raw
    links: int = 1  # messages in the chain, this one included
    revoked: bool = False

    @property
    def message(self) -> MessageId:
        return (self.key, self.seq, 0)


@dataclass(frozen=True)
class Execution:
    """One run of a task body, as the task itself recorded it; ``end`` is None if it never ended."""

    key: str
    seq: int
    link: int
    task_id: str
    pid: int
    start: float
    end: float | None
    outcome: str | None  # ok, fail, or None (killed, or still frozen)
    sleep: float = 0.0

    @property
    def message(self) -> MessageId:
        return (self.key, self.seq, self.link)

    def busy_until(self) -> float:
        """When the execution stopped occupying its partition (a killed one: at most its planned end)."""
        return self.end if self.end is not None else self.start + self.sleep + 1.0


@dataclass(frozen=True)
class Fault:
    """One nemesis operation, from when it was done until it was undone."""

    kind: str
    start: float
    end: float
    target: str = ""
    #: Tasks the victim may have been running at once (its pool's concurrency; 1 for a pool process).
    slots: int = 1

    @property
    def duplicates_allowed(self) -> int:
        """Executions this fault may legitimately repeat (documented: one per task running in the victim)."""
        return self.slots if self.kind in ("kill_pool", "kill_worker", "stop_worker", "stop_past_lease") else 0


@dataclass(frozen=True)
class Sample:
    """Messages waiting per partition (on Redis including unacknowledged ones) at time ``t``."""

    t: float
    depths: dict[int, int]


@dataclass(frozen=True)
class Row:
    """A ``ParkedMessage`` row of the run: its task id and, read from its body, its message."""

    task_id: str
    state: str
    reason: str
    message: MessageId | None = None


@dataclass
class History:
    """Everything the checker looks at."""

    publishes: list[Publish] = field(default_factory=list)
    executions: list[Execution] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    final_depths: dict[int, int] = field(default_factory=dict)
    partitions: int = 8

    @property
    def t0(self) -> float:
        """When the run began (its first publish): violations give times in seconds from then."""
        return min((p.t for p in self.publishes), default=0.0)

    def to_json(self) -> str:
        """A dump to keep next to a failing seed."""
        from dataclasses import asdict

        return json.dumps({name: [asdict(x) for x in getattr(self, name)]
                           for name in ("publishes", "executions", "faults", "samples", "rows")}
                          | {"final_depths": self.final_depths, "partitions": self.partitions})


def executions_from_events(events: list[Any]) -> list[Execution]:
    """Pair the start and end events the tasks recorded (JSON strings or dicts) into executions."""
    starts: dict[str, dict[str, Any]] = {}
    ends: dict[str, dict[str, Any]] = {}
    for raw in events:
        event = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        (starts if event["ev"] == "start" else ends)[event["x"]] = event
    executions = []
    for x, s in starts.items():
        e = ends.get(x)
        executions.append(Execution(key=s["key"], seq=int(s["seq"]), link=int(s["link"]), task_id=s["id"],
                                    pid=int(s["pid"]), start=float(s["t"]),
                                    end=float(e["t"]) if e else None, outcome=e["outcome"] if e else None,
                                    sleep=float(s.get("sleep", 0.0))))
    executions.sort(key=lambda ex: ex.start)
    return executions
