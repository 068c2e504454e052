"""The last message each partition completed, kept in Redis to recognise redelivered copies."""

from __future__ import annotations

import functools
import logging
from typing import Any

import redis

from ..conf import get_settings
from ..partitioning import queue_name

logger = logging.getLogger(__name__)


class Ledger:
    """Per partition, the id of the last task that completed on its consumer.

    A partition runs one message at a time, so a redelivered message (its
    worker died before acknowledging it) is the partition's last completed
    task exactly when it already ran to the end.
    """

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, partition: int) -> str:
        return f"ordered_tasks:done:{queue_name(self.prefix, partition)}"

    def record(self, partition: int, task_id: str) -> None:
        """Note that ``task_id`` completed (best effort: a failure is logged)."""
        try:
            self.client.set(self._key(partition), task_id)
        except redis.RedisError as exc:
            logger.warning("Could not record completion of %s: %r", task_id, exc)

    def completed(self, partition: int, task_id: str) -> bool:
        """Whether ``task_id`` was the last task to complete in ``partition``."""
        try:
            last = self.client.get(self._key(partition))
        except redis.RedisError as exc:
            logger.warning("Could not read the completion ledger: %r", exc)
            return False
        if isinstance(last, bytes):
            last = last.decode()
        return last == task_id


@functools.lru_cache(maxsize=4)
def _ledger(url: str, prefix: str) -> Ledger:
    return Ledger(redis.Redis.from_url(url), prefix)


def ledger_for(app: Any) -> Ledger | None:
    """The ledger of this process, or None when no Redis is configured or available."""
    conf = get_settings()
    url = conf.coordination_url(app.conf.broker_url)
    return _ledger(url, conf.queue_prefix) if url else None
