"""Seeded workload: bursts over many keys and a few hot ones, idle periods, failures, operators, revokes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields


@dataclass
class WorkloadConfig:
    """What the workload does; every feature is a switch."""

    keys: int = 40
    hot_keys: int = 3
    bursts: int = 6
    burst_size: tuple[int, int] = (20, 60)
    gap: tuple[float, float] = (1.0, 6.0)
    #: Publishes per second within a burst (exponential gaps).
    rate: float = 15.0
    #: Idle periods longer than every timeout of the stack (kombu's Redis health check: 25 s).
    long_idle: bool = True
    long_idles: int = 1
    long_idle_seconds: tuple[float, float] = (27.0, 31.0)
    #: Tasks that fail a few times, then succeed (in-place retries via autoretry_for).
    retries: bool = True
    #: The same through ``self.retry``.
    self_retry: bool = True
    #: Tasks that fail until healed: their key is blocked, later messages parked.
    poison: bool = True
    #: ``replay(key)`` and ``skip(key)`` on blocked keys during the run.
    operator: bool = True
    #: ``app.control.revoke(task_id)`` of recently published messages.
    revokes: bool = True
    #: Chains of ordered tasks of one key.
    chains: bool = True
    #: Messages built by hand and published with kombu, as a producer in another language would.
    raw: bool = True
    #: Raw messages without the ``ordered_partition`` header (only ``ordered_key``).
    raw_without_partition: bool = False
    #: Raw messages with neither header: the worker reads the key from the arguments (on Redis,
    #: such a message of a hot key goes behind the key's messages set aside).
    raw_without_key: bool = True
    #: Rare tasks that run longer than 25 s.
    long_tasks: bool = False

    @classmethod
    def switches(cls) -> list[str]:
        """The names of the boolean switches."""
        return [f.name for f in fields(cls) if f.type in ("bool", bool)]


@dataclass(frozen=True)
class Publish:
    """Publish one message (or chain) of ``key`` with sequence number ``seq``."""

    key: str
    seq: int
    kind: str = "task"  # task, self_retry, chain, raw
    sleep: float = 0.0
    fail: int = 0
    poison: bool = False
    links: int = 1
    partition_header: bool = True
    key_header: bool = True


@dataclass(frozen=True)
class Idle:
    """Publish nothing for ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class Operator:
    """Replay or skip one of the run's blocked keys (``pick`` in [0, 1) chooses which)."""

    action: str  # replay or skip
    pick: float
    heal: bool  # clear the key's poison first, so the replay succeeds


@dataclass(frozen=True)
class Revoke:
    """Revoke the message published ``back`` publishes ago (a plain task, not a chain)."""

    back: int


Op = Publish | Idle | Operator | Revoke


@dataclass
class Workload:
    """The generated operations and the keys they use."""

    ops: list[Op] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    @property
    def publishes(self) -> int:
        return sum(1 for op in self.ops if isinstance(op, Publish))


def _sleep(rng: random.Random, config: WorkloadConfig) -> float:
    roll = rng.random()
    if config.long_tasks and roll < 0.003:
        return rng.uniform(26.0, 30.0)
    if roll < 0.70:
        return rng.uniform(0.001, 0.005)
    if roll < 0.96:
        return rng.uniform(0.01, 0.2)
    return rng.uniform(0.5, 2.0)


def _message(rng: random.Random, config: WorkloadConfig, key: str, seq: int) -> Publish:
    roll = rng.random()
    sleep = _sleep(rng, config)
    if config.poison and roll < 0.02:
        return Publish(key, seq, sleep=sleep, poison=True)
    if config.retries and roll < 0.07:
        return Publish(key, seq, sleep=sleep, fail=rng.randint(1, 2))
    if config.self_retry and roll < 0.10:
        return Publish(key, seq, kind="self_retry", sleep=sleep, fail=rng.randint(1, 3))
    if config.chains and roll < 0.14:
        return Publish(key, seq, kind="chain", sleep=min(sleep, 0.2), links=rng.randint(2, 4))
    if config.raw and roll < 0.22:
        header = not (config.raw_without_partition and rng.random() < 0.3)
        if config.raw_without_key and rng.random() < 0.3:
            return Publish(key, seq, kind="raw", sleep=sleep, partition_header=False, key_header=False)
        return Publish(key, seq, kind="raw", sleep=sleep, partition_header=header)
    return Publish(key, seq, sleep=sleep)


def generate(seed: int, config: WorkloadConfig, prefix: str) -> Workload:
    """The operations of one run, the same for the same seed, config and prefix."""
    rng = random.Random(seed)
    keys = [f"{prefix}-k{i}" for i in range(config.keys)]
    hot = [f"{prefix}-hot{i}" for i in range(config.hot_keys)]
    seqs = dict.fromkeys(keys + hot, 0)
    long_after = set(rng.sample(range(1, config.bursts), min(config.long_idles, config.bursts - 1))
                     if config.long_idle else [])
    workload = Workload(keys=keys + hot)
    for burst in range(config.bursts):
        if burst in long_after:
            workload.ops.append(Idle(rng.uniform(*config.long_idle_seconds)))
        elif burst:
            workload.ops.append(Idle(rng.uniform(*config.gap)))
        for _ in range(rng.randint(*config.burst_size)):
            key = rng.choice(hot) if hot and rng.random() < 0.4 else rng.choice(keys)
            seqs[key] += 1
            workload.ops.append(_message(rng, config, key, seqs[key]))
            workload.ops.append(Idle(rng.expovariate(config.rate)))
            roll = rng.random()
            if config.revokes and roll < 0.02:
                workload.ops.append(Revoke(rng.randint(1, 10)))
            elif config.operator and roll < 0.04:
                workload.ops.append(Operator(rng.choice(["replay", "skip"]), rng.random(), rng.random() < 0.7))
            elif roll < 0.08:
                workload.ops.append(Idle(rng.uniform(0.0, 0.3)))
    return workload
