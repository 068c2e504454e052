"""On a Redis broker, a message handed back goes to the head of its queue, where it came from."""

from __future__ import annotations

import functools
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual.base import QoS as VirtualQoS


class HeadQoS(kombu_redis.QoS):  # type: ignore[misc]
    """Kombu's Redis QoS, except that a requeued message goes back to the head of its queue.

    Kombu requeues at the back (``LPUSH``; consumers pop from the other
    end), which lets every later message of the key overtake it. Nothing is
    restored at shutdown either: the next lease holder puts a worker's
    unacknowledged messages back at the head.
    """

    restore_at_shutdown = False

    def append(self, message: Any, delivery_tag: str) -> None:
        from .fetch import ReliableChannel

        if isinstance(self.channel, ReliableChannel):
            # The fetch script recorded it as unacknowledged already: save the round trip.
            VirtualQoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not requeue:
            super().reject(delivery_tag, requeue=False)
            return
        self.restore_by_tag(delivery_tag, leftmost=False)
        VirtualQoS.ack(self, delivery_tag)


def _reject_inbound_at_head(transport: Any, raw_message: Any) -> None:
    """Kombu's handling of a message popped for a queue no longer consumed, requeueing at the head.

    It happens when a consumer is cancelled (lease lost, shutdown) while its
    ``BRPOP`` is in flight; the reply is still read and must not move the
    message behind later ones.
    """
    for channel in transport.channels:
        if channel:
            message = channel.Message(raw_message, channel=channel)
            channel.qos.append(message, message.delivery_tag)
            channel.qos.restore_by_tag(message.delivery_tag, leftmost=False)
            VirtualQoS.ack(channel.qos, message.delivery_tag)
            return


def requeue_at_head(consumer: Any) -> None:
    """Make the task channel and the transport of a Redis worker consumer requeue at the head."""
    consumer.task_consumer.channel.qos.__class__ = HeadQoS
    transport = consumer.connection.transport
    transport._reject_inbound_message = functools.partial(_reject_inbound_at_head, transport)
