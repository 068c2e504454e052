"""The QoS of an ordered worker's Redis task channel: messages handed back go to the head."""

from __future__ import annotations

import functools
import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual.base import QoS as VirtualQoS

from .fetch import ReliableChannel

logger = logging.getLogger(__name__)


class HeadQoS(kombu_redis.QoS):  # type: ignore[misc]
    """Kombu's Redis QoS, except that a requeued message goes back to the head of its queue.

    Kombu requeues at the back (``LPUSH``; consumers pop from the other
    end), which lets every later message of the key overtake it. Nothing is
    restored at shutdown either: the next lease holder puts a worker's
    unacknowledged messages back at the head.

    Celery acknowledges through a callback that can run after the broker
    connection was lost and the channel closed; kombu then raises
    ``AttributeError``, which stops the worker. Here it is a warning: the
    message stays unacknowledged, this worker puts it back at the head when
    it reconnects (or the partition's next owner does), and the completion
    ledger recognises it if it already ran.
    """

    restore_at_shutdown = False

    def append(self, message: Any, delivery_tag: str) -> None:
        if isinstance(self.channel, ReliableChannel):
            # The fetch script recorded it as unacknowledged already: save the round trip.
            VirtualQoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if self._closed("acknowledge", delivery_tag):
            return
        if isinstance(self.channel, ReliableChannel):
            if self.channel.forget(delivery_tag):  # else it is sent again later
                VirtualQoS.ack(self, delivery_tag)
        else:
            super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self._closed("reject", delivery_tag):
            return
        if requeue:
            _requeue_at_head(self, delivery_tag)
        else:
            super().reject(delivery_tag, requeue=False)

    def _closed(self, what: str, delivery_tag: str) -> bool:
        """Whether the channel closed with its broker connection (the message is then left alone)."""
        if self.channel.connection is not None:
            return False
        message = self._delivered.get(delivery_tag)
        logger.warning("Could not %s message %s: its broker connection closed; it stays "
                       "unacknowledged and comes back at the head of its queue.",
                       what, (getattr(message, "headers", None) or {}).get("id", delivery_tag))
        return True


def _requeue_at_head(qos: Any, delivery_tag: str) -> None:
    """Move an unacknowledged message back to the head of its queue and forget it here."""
    qos.restore_by_tag(delivery_tag, leftmost=False)
    VirtualQoS.ack(qos, delivery_tag)


def _reject_inbound_at_head(transport: Any, raw_message: Any) -> None:
    """Kombu's handling of a message popped for a queue no longer consumed, requeueing at the head.

    It happens when a consumer is cancelled (lease lost, shutdown) while its
    fetch is in flight; the reply is still read and must not move the
    message behind later ones.
    """
    for channel in transport.channels:
        if channel:
            message = channel.Message(raw_message, channel=channel)
            channel.qos.append(message, message.delivery_tag)
            _requeue_at_head(channel.qos, message.delivery_tag)
            return


def requeue_at_head(consumer: Any) -> None:
    """Make the task channel and the transport of a Redis worker consumer requeue at the head."""
    consumer.task_consumer.channel.qos.__class__ = HeadQoS
    transport = consumer.connection.transport
    transport._reject_inbound_message = functools.partial(_reject_inbound_at_head, transport)
