"""Exceptions raised by ordered_tasks for mistakes a user can make."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


class OrderedTaskError(Exception):
    """Base class of every error ordered_tasks raises on purpose."""


class InvalidKeyError(OrderedTaskError, ValueError):
    """The ordering key of a task is missing, empty or of an unsupported type."""


class UnsafeOptionError(OrderedTaskError, ValueError):
    """A publish or task option would break per-key ordering."""


class ConfigurationError(OrderedTaskError, ImproperlyConfigured):
    """The ``ORDERED_TASKS`` setting or the Celery app is not usable."""


class UnsafeWorkerOptionError(OrderedTaskError):
    """A worker option would let two tasks of one partition overlap or reorder."""


class UnknownKeyError(OrderedTaskError, LookupError):
    """Replay or skip of a key that has no recorded state (it never failed)."""


class KeyNotBlockedError(OrderedTaskError):
    """Replay or skip of a key that is active: there is nothing to replay or skip."""


class StaleOwnerError(OrderedTaskError):
    """A worker that lost its partition's lease tried to change the state of its keys."""


class RunnerError(OrderedTaskError):
    """The testing helper, :class:`~ordered_tasks.testing.OrderedTasksRunner`, cannot do what was asked."""
