"""Per-key ordered execution of Celery tasks for Django projects."""

from __future__ import annotations

from .actions import replay, skip
from .decorators import ordered_task
from .exceptions import (
    ConfigurationError,
    InvalidKeyError,
    KeyNotBlockedError,
    OrderedTaskError,
    UnknownKeyError,
    UnsafeOptionError,
    UnsafeWorkerOptionError,
)
from .partitioning import canonical_key, partition_for
from .plugin import install
from .queues import queue_for
from .task import OrderedTask

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "InvalidKeyError",
    "KeyNotBlockedError",
    "OrderedTask",
    "OrderedTaskError",
    "UnknownKeyError",
    "UnsafeOptionError",
    "UnsafeWorkerOptionError",
    "canonical_key",
    "install",
    "ordered_task",
    "partition_for",
    "queue_for",
    "replay",
    "skip",
]
