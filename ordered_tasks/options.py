"""Publish and task options that would break per-key ordering."""

from __future__ import annotations

from typing import Any, Mapping

from .exceptions import UnsafeOptionError

#: Message header carrying the canonical ordering key.
KEY_HEADER = "ordered_key"
#: Message header carrying the partition number.
PARTITION_HEADER = "ordered_partition"
#: Message header carrying the publish time (seconds since the epoch), for queue waits.
PUBLISHED_HEADER = "ordered_published_at"
#: Name of the task that carries replay, skip and retry wake-up messages.
CONTROL_TASK = "ordered_tasks.control"

_DELAYED = (
    "a delayed message is held aside in worker memory while later messages of its key "
    "overtake it. Publish the task when it is due instead, for example from a periodic "
    "task, or use a plain Celery task"
)
_ROUTED = "ordered_tasks chooses the partition queue from the key. Remove the option"
_WHY = {
    "countdown": _DELAYED,
    "eta": _DELAYED,
    "expires": "an expired message would leave a silent hole in its key's sequence. "
    "Remove the option; make the task itself ignore stale events if it must",
    "priority": "priorities reorder messages inside a partition queue. Remove the option",
    "queue": _ROUTED,
    "exchange": _ROUTED,
    "routing_key": _ROUTED,
}
PUBLISH_FORBIDDEN = tuple(_WHY)
#: What a task failure does once retries are exhausted (``failure_policy``).
FAILURE_POLICIES = ("block", "continue")
DECORATOR_FORBIDDEN = ("queue", "exchange", "routing_key", "priority", "expires", "rate_limit")


def check_publish_options(task_name: str, options: Mapping[str, Any]) -> None:
    """Raise UnsafeOptionError if a publish option would break ordering."""
    for name in PUBLISH_FORBIDDEN:
        value = options.get(name)
        if value is not None:
            shown = getattr(value, "name", value)  # a kombu Queue or Exchange by its name
            raise UnsafeOptionError(
                f"{task_name} is an ordered task and cannot be published with "
                f"{name}={shown!r}: {_WHY[name]}."
            )


def check_task_options(task_label: str, options: Mapping[str, Any]) -> None:
    """Raise UnsafeOptionError if a decorator option would break ordering."""
    for name in DECORATOR_FORBIDDEN:
        if options.get(name) is not None:
            why = _WHY.get(name, "a rate limit holds messages aside so that later ones overtake them")
            raise UnsafeOptionError(
                f"@ordered_task on {task_label} cannot take {name}={options[name]!r}: {why}."
            )
    if options.get("acks_late") is False:
        raise UnsafeOptionError(
            f"@ordered_task on {task_label} cannot take acks_late=False: an early "
            "acknowledged message is lost if its worker dies. Remove the option."
        )
    policy = options.get("failure_policy", "block")
    if policy not in FAILURE_POLICIES:
        raise UnsafeOptionError(
            f"@ordered_task on {task_label} got failure_policy={policy!r}. Use one of "
            f"{', '.join(map(repr, FAILURE_POLICIES))}."
        )
