"""The fencing token of the message being run, for the database writes it causes."""

from __future__ import annotations

from contextvars import ContextVar

#: The consumer's fencing token for the current message's partition (Redis
#: leases), or None where there is none (RabbitMQ: single active consumer).
FENCE: ContextVar[int | None] = ContextVar("ordered_tasks_fence", default=None)
