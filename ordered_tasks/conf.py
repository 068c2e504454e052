"""The ``ORDERED_TASKS`` setting: one typed object, read lazily and validated."""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from .exceptions import ConfigurationError

RouteKey = Union[str, int]

DEFAULTS: dict[str, Any] = {
    "PARTITIONS": 16,
    "QUEUE_PREFIX": "ordered",
    "ROUTES": {},
    "CELERY_APP": None,
    "REDIS_URL": None,
    "WINDOW": 16,
    "METRICS_PORT": None,
}
#: URL schemes of a Redis server (broker, leases, completion ledger).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
MAX_PARTITIONS = 4096
#: The largest ``WINDOW``: unacknowledged messages a consumer holds per partition.
MAX_WINDOW = 1000
#: The highest TCP port.
MAX_PORT = 65535
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-:]*(\.[A-Za-z0-9_\-:]+)*$")
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the setting, in the words of a system check."""

    id: str
    msg: str
    hint: str


@dataclass(frozen=True)
class OrderedTasksSettings:
    """Validated values of ``settings.ORDERED_TASKS``."""

    partitions: int = 16
    queue_prefix: str = "ordered"
    routes: tuple[tuple[re.Pattern[str], RouteKey], ...] = field(default_factory=tuple)
    celery_app: str | None = None
    redis_url: str | None = None
    #: Unacknowledged messages a partition's consumer holds at once (the messages of
    #: different keys among them run at the same time, those of one key one by one).
    window: int = 16
    #: TCP port of the Prometheus metrics of worker process 0; worker *i* serves them on
    #: ``metrics_port + i``. None: no metrics.
    metrics_port: int | None = None

    def coordination_url(self, broker_url: str | None) -> str | None:
        """Redis for leases and the completion ledger: ``REDIS_URL``, else a Redis broker."""
        if self.redis_url:
            return self.redis_url
        if broker_url and broker_url.startswith(REDIS_SCHEMES):
            return broker_url
        return None

    def route_key_for(self, task_name: str) -> RouteKey | None:
        """The key argument that ``ROUTES`` declares for ``task_name``, if any."""
        for pattern, key in self.routes:
            if pattern.match(task_name):
                return key
        return None

    def partition_of_queue(self, name: str) -> int | None:
        """Partition number of an ordered queue name, or None for other queues."""
        head, sep, tail = name.rpartition(".")
        if head != self.queue_prefix or not sep or not tail.isdigit():
            return None
        number = int(tail)
        if str(number) != tail or number >= self.partitions:
            return None
        return number


def _raw() -> Mapping[str, Any]:
    return getattr(django_settings, "ORDERED_TASKS", None) or {}


def find_problems(raw: Any) -> list[Problem]:
    """Every problem of a raw ``ORDERED_TASKS`` value (empty list: valid)."""
    if not isinstance(raw, Mapping):
        return [Problem("ordered_tasks.E001", "ORDERED_TASKS must be a dict.",
                        "Set ORDERED_TASKS = {\"PARTITIONS\": 16} in your settings.")]
    problems: list[Problem] = []
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        problems.append(Problem(
            "ordered_tasks.E002", f"ORDERED_TASKS has unknown keys: {', '.join(map(str, unknown))}.",
            f"Valid keys are {', '.join(sorted(DEFAULTS))}; check the spelling."))
    partitions = raw.get("PARTITIONS", DEFAULTS["PARTITIONS"])
    if isinstance(partitions, bool) or not isinstance(partitions, int) or not (
        1 <= partitions <= MAX_PARTITIONS
    ):
        problems.append(Problem(
            "ordered_tasks.E003", f"ORDERED_TASKS['PARTITIONS'] is {partitions!r}.",
            f"Use a whole number from 1 to {MAX_PARTITIONS}; it is the number of "
            "partition queues (the workers' pools bound the parallelism)."))
    prefix = raw.get("QUEUE_PREFIX", DEFAULTS["QUEUE_PREFIX"])
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        problems.append(Problem(
            "ordered_tasks.E004", f"ORDERED_TASKS['QUEUE_PREFIX'] is {prefix!r}.",
            "Use letters, digits, '_', '-', ':' and inner dots, for example 'ordered'."))
    problems.extend(_route_problems(raw.get("ROUTES", DEFAULTS["ROUTES"])))
    app = raw.get("CELERY_APP", DEFAULTS["CELERY_APP"])
    if app is not None and (not isinstance(app, str) or not app.strip()):
        problems.append(Problem(
            "ordered_tasks.E006", f"ORDERED_TASKS['CELERY_APP'] is {app!r}.",
            "Use the dotted path of your Celery app, for example 'proj.celery:app', or leave it out."))
    redis_url = raw.get("REDIS_URL", DEFAULTS["REDIS_URL"])
    if redis_url is not None and (not isinstance(redis_url, str) or not redis_url.startswith(REDIS_SCHEMES)):
        problems.append(Problem(
            "ordered_tasks.E007", f"ORDERED_TASKS['REDIS_URL'] is {redis_url!r}.",
            "Use a Redis URL such as 'redis://localhost:6379/0', or leave it out to use a Redis broker."))
    window = raw.get("WINDOW", DEFAULTS["WINDOW"])
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
        problems.append(Problem(
            "ordered_tasks.E008", f"ORDERED_TASKS['WINDOW'] is {window!r}.",
            f"Use a whole number from 1 to {MAX_WINDOW}: the unacknowledged messages a worker "
            "holds per partition. 1 runs one task at a time per partition; the default is 16."))
    port = raw.get("METRICS_PORT", DEFAULTS["METRICS_PORT"])
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 1 <= port <= MAX_PORT):
        problems.append(Problem(
            "ordered_tasks.E009", f"ORDERED_TASKS['METRICS_PORT'] is {port!r}.",
            f"Use None (no metrics) or a TCP port from 1 to {MAX_PORT}: worker process i of "
            "ordered_worker serves its Prometheus metrics on METRICS_PORT + i."))
    return problems


def _route_problems(routes: Any) -> list[Problem]:
    hint = ("ROUTES maps task-name patterns (glob strings as in task_routes, or "
            "compiled regexes) to the key argument: a keyword name such as "
            "'account_id', or a positional index such as 0.")
    if not isinstance(routes, Mapping):
        return [Problem("ordered_tasks.E005", f"ORDERED_TASKS['ROUTES'] is {routes!r}.", hint)]
    problems = []
    for pattern, key in routes.items():
        if not isinstance(pattern, (str, re.Pattern)) or pattern == "":
            problems.append(Problem(
                "ordered_tasks.E005", f"ROUTES pattern {pattern!r} is not a task-name pattern.", hint))
        valid_key = (isinstance(key, str) and _IDENTIFIER_RE.match(key)) or (
            isinstance(key, int) and not isinstance(key, bool) and key >= 0)
        if not valid_key:
            problems.append(Problem(
                "ordered_tasks.E005", f"ROUTES[{pattern!r}] is {key!r}, not a key argument.", hint))
    return problems


def _compile(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    return re.compile(fnmatch.translate(pattern))


def build(raw: Any) -> OrderedTasksSettings:
    """Validate a raw ``ORDERED_TASKS`` value and build the typed settings."""
    problems = find_problems(raw)
    if problems:
        raise ConfigurationError("; ".join(f"{p.msg} {p.hint}" for p in problems))
    merged = {**DEFAULTS, **raw}
    return OrderedTasksSettings(
        partitions=merged["PARTITIONS"],
        queue_prefix=merged["QUEUE_PREFIX"],
        routes=tuple((_compile(p), k) for p, k in merged["ROUTES"].items()),
        celery_app=merged["CELERY_APP"],
        redis_url=merged["REDIS_URL"],
        window=merged["WINDOW"],
        metrics_port=merged["METRICS_PORT"],
    )


@functools.lru_cache(maxsize=1)
def get_settings() -> OrderedTasksSettings:
    """The current settings, read on first use and cached until they change."""
    return build(_raw())


@receiver(setting_changed)
def _reset(setting: str, **_: Any) -> None:
    if setting == "ORDERED_TASKS":
        get_settings.cache_clear()
