"""The QoS of an ordered worker's Redis channels: messages handed back go to the head."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual.base import QoS as VirtualQoS

from ..health import metrics
from ..redelivery.ledger import flush_completions
from ..sequencing.handoff import LOOP

logger = logging.getLogger(__name__)


class HeadQoS(kombu_redis.QoS):  # type: ignore[misc]
    """Kombu's Redis QoS, except that a requeued message goes back to the head of its queue.

    Kombu requeues at the back (``LPUSH``; consumers pop from the other
    end), which lets every later message of the key overtake it. Nothing is
    restored at shutdown either: the next lease holder puts a worker's
    unacknowledged messages back at the head.

    It also counts the messages each queue has in the window, and tells the
    channel's lanes when a message settles, so that its key's next message
    starts.

    Celery acknowledges through a callback that can run after the broker
    connection was lost and the channel closed; kombu then raises
    ``AttributeError``, which stops the worker. Here it is a warning: the
    message stays unacknowledged, this worker puts it back at the head when
    it reconnects (or the partition's next owner does), and the completion
    ledger recognises it if it already ran.
    """

    restore_at_shutdown = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Delivery tag -> queue, of the unacknowledged messages that take a place in their
        #: queue's window (a retry's wake-up waiting for its time does not).
        self._placed: dict[str, str] = {}
        #: Delivery tag -> queue, of the unacknowledged messages held outside the window: a
        #: retry's wake-up waiting for its time (``_held``), a held key's message waiting to be
        #: parked (``_parking``, bounded by the lanes' parking room). Dictionaries, whose single
        #: operations pool threads and the event loop may do at once.
        self._held: dict[str, str] = {}
        self._parking: dict[str, str] = {}
        #: Queue -> unacknowledged messages that take a place in its window.
        self.in_window: Counter[str] = Counter()

    def append(self, message: Any, delivery_tag: str) -> None:
        if getattr(self.channel, "fetches_reliably", False):
            # The fetch script recorded it as unacknowledged already: save the round trip.
            VirtualQoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)
        queue = (message.delivery_info or {}).get("routing_key")
        if isinstance(queue, str) and delivery_tag not in self._placed:
            self._placed[delivery_tag] = queue
            self.in_window[queue] += 1

    def can_consume(self) -> bool:
        """Whether the channel may fetch: its messages in windows are under the prefetch count.

        With the reliable fetch, a held key's message waiting to be parked
        does not count: the lanes bound those by their parking room. Kombu
        counts every unacknowledged message, so a hot key's messages waiting
        for their batch would stop the fetch for every partition.
        """
        if getattr(self.channel, "fetches_reliably", False):
            limit = self.prefetch_count
            return not limit or len(self._placed) + len(self._held) < limit
        return bool(super().can_consume())

    def hold(self, delivery_tag: str) -> None:
        """The message waits for its time outside the window (it stays unacknowledged)."""
        self._leave_window(delivery_tag, parking=False)

    def park_outside(self, delivery_tag: str) -> None:
        """The message waits to be parked outside the window (it stays unacknowledged)."""
        self._leave_window(delivery_tag, parking=True)

    def _leave_window(self, delivery_tag: str, parking: bool) -> None:
        queue = self._placed.pop(delivery_tag, None)
        if queue is not None:
            self.in_window[queue] -= 1
            (self._parking if parking else self._held)[delivery_tag] = queue

    def _forget(self, delivery_tag: str) -> None:
        """The message is settled (or went back to its queue): it holds no place any more."""
        queue = self._placed.pop(delivery_tag, None)
        if queue is not None:
            self.in_window[queue] -= 1
        self._held.pop(delivery_tag, None)
        self._parking.pop(delivery_tag, None)

    def forget_queue(self, queue: str) -> None:
        """Drop what this channel holds of ``queue``: its records went back to the queue with a new tenure."""
        tags = [t for group in (self._placed, self._held, self._parking)
                for t, q in list(group.items()) if q == queue]
        for tag in tags:
            self._forget(tag)
            self._delivered.pop(tag, None)  # type: ignore[union-attr]

    def moved_away(self, delivery_tag: str) -> None:
        """The message went back to Redis with its record (behind its key's messages set aside)."""
        VirtualQoS.ack(self, delivery_tag)
        self._forget(delivery_tag)

    def acknowledged(self, delivery_tag: str) -> None:
        """Redis took the acknowledgement: forget the message here."""
        VirtualQoS.ack(self, delivery_tag)
        self._forget(delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        flush_completions()  # the completion ledger first: a redelivered copy is recognised
        if self._closed("acknowledge", delivery_tag):
            return
        self._wake_if_full(delivery_tag)
        forget = getattr(self.channel, "forget", None)
        if forget is not None:
            if forget(delivery_tag):  # else it is sent again later
                self.acknowledged(delivery_tag)
        else:
            super().ack(delivery_tag)
            self._forget(delivery_tag)
        self._settled(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self._closed("reject", delivery_tag):
            return
        if requeue:
            lanes = getattr(self.channel, "lanes", None)
            for follower in reversed(lanes.recall(delivery_tag) if lanes is not None else []):
                # Later messages of its key that waited in the window go back first, so
                # that it ends up in front of them.
                _requeue_at_head(self, follower.tag)
            _requeue_at_head(self, delivery_tag)
        else:
            super().reject(delivery_tag, requeue=False)
        self._forget(delivery_tag)
        self._settled(delivery_tag)

    def _wake_if_full(self, delivery_tag: str) -> None:
        """An acknowledgement in a pool thread frees a place in a full window: wake the loop to fetch.

        Nothing else would: with every window full no fetch is in flight, and
        the lanes wake the loop only when a message of the key waits.
        """
        queue = self._placed.get(delivery_tag)
        window = getattr(self.channel, "window", 0)
        if (queue is not None and getattr(self.channel, "fetches_reliably", False)
                and self.in_window[queue] >= window and not LOOP.in_loop()):
            LOOP.call(_fetch_again)

    def _settled(self, delivery_tag: str) -> None:
        lanes = getattr(self.channel, "lanes", None)
        if lanes is not None:
            lanes.settled(delivery_tag)

    def _closed(self, what: str, delivery_tag: str) -> bool:
        """Whether the channel closed with its broker connection (the message is then left alone)."""
        if self.channel.connection is not None:
            return False
        message = self._delivered.get(delivery_tag)
        metrics.acknowledgement_failed(self, delivery_tag, metrics.ACK_CONNECTION_CLOSED)
        logger.warning("Could not %s message %s: its broker connection closed; it stays "
                       "unacknowledged and comes back at the head of its queue.",
                       what, (getattr(message, "headers", None) or {}).get("id", delivery_tag))
        return True


def _fetch_again() -> None:
    """Nothing to do: the event loop, woken, starts a fetch as it goes round."""


def _requeue_at_head(qos: Any, delivery_tag: str) -> None:
    """Move an unacknowledged message back to the head of its queue and forget it here."""
    qos.restore_by_tag(delivery_tag, leftmost=False)
    VirtualQoS.ack(qos, delivery_tag)
    qos._forget(delivery_tag)
