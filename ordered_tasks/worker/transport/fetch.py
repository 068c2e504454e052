"""Reliable fetch on Redis: a message leaves its queue only together with its unacknowledged record."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from queue import Empty
from time import monotonic, time
from typing import Any
from uuid import uuid4

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from ...conf import get_settings
from ..health import metrics
from ..sequencing.lanes import Lanes
from ..sequencing.window import key_limit, new_lanes
from ..unanswered import Unanswered
from .qos import HeadQoS

logger = logging.getLogger(__name__)

#: Kombu's reading of the reply, which is the same for the script as for ``BRPOP``.
_Channel: Any = kombu_redis.Channel
_read_reply: Any = _Channel._brpop_read

#: Seconds an ordered worker waits before fetching again after finding its queues empty.
IDLE_WAIT = 0.02
#: Seconds between two attempts to send acknowledgements that Redis did not take.
ACK_RETRY = 1.0

#: Messages the fetch looks through, from the head of a queue, for one whose key is not
#: crowded in the worker's window.
LOOK_AHEAD = 64

#: Messages one fetch takes at most, from all the queues it looks at.
FETCH_BATCH = 64
#: Seconds between the delivery times of the messages of one fetch (their order at a takeover).
DELIVERY_STEP = 1e-6

#: Pop the first messages of the queues, each queue up to its free places in the window,
#: and record each as unacknowledged, in one step. KEYS: the queues, then kombu's unacked
#: hash and unacked index. ARGV: the time of delivery of the first message (each next one
#: DELIVERY_STEP later), a delivery tag base for a message that has none, the most messages
#: to take, then each queue's name (as in KEYS, without prefix and priority suffix), then
#: for each queue a JSON list of its crowded keys ('' for none), then each queue's free
#: places (priority lists of one queue share them). Returns the queue name and the message
#: of each message taken, in the order taken, or false.
#:
#: A queue with crowded keys gives its first message whose ``ordered_key`` header is a
#: string that is not crowded, looking through at most LOOK_AHEAD messages; the messages
#: it looks past stay in place, so each key's messages still come in their order. A message
#: whose key it cannot read ends the look (it may belong to a crowded key), unless it is
#: the head.
#:
#: Nothing may fail after the pop (a script's writes are not undone): an item that is
#: not a kombu message for this queue (no delivery tag, no delivery info, another queue's
#: routing key, not JSON at all) is wrapped, hex-encoded, into a message with a tag of its
#: own and no headers, which the worker parks as invalid.
_FETCH = """
local function hex(text)
  return (string.gsub(text, '.', function(c) return string.format('%02x', string.byte(c)) end))
end
local function key_of(item)
  local ok, message = pcall(cjson.decode, item)
  local headers = ok and type(message) == 'table' and message['headers']
  local key = type(headers) == 'table' and headers['ordered_key']
  if type(key) == 'string' then return key end
  return nil
end
local function take(queue, crowded)
  if crowded == nil then return redis.call('RPOP', queue) end
  local items = redis.call('LRANGE', queue, -LOOK_AHEAD, -1)
  for j = #items, 1, -1 do
    local key = key_of(items[j])
    if j == #items and (key == nil or not crowded[key]) then return redis.call('RPOP', queue) end
    if key == nil then return false end
    if not crowded[key] then
      redis.call('LREM', queue, -1, items[j])
      return items[j]
    end
  end
  return false
end
local count = (#KEYS - 2)
local most = tonumber(ARGV[3])
local at = tonumber(ARGV[1])
local free = {}
for i = 1, count do free[ARGV[3 + i]] = tonumber(ARGV[3 + 2 * count + i]) or 0 end
local taken = {}
local n = 0
for i = 1, count do
  local queue = ARGV[3 + i]
  local crowded = nil
  local crowded_json = ARGV[3 + count + i] or ''
  if crowded_json ~= '' then
    crowded = {}
    for _, key in ipairs(cjson.decode(crowded_json)) do crowded[key] = true end
  end
  while n < most and free[queue] > 0 do
    local item = take(KEYS[i], crowded)
    if not item then break end
    n = n + 1
    free[queue] = free[queue] - 1
    local tag, record
    local ok, message = pcall(cjson.decode, item)
    local props = ok and type(message) == 'table' and message['properties']
    local info = type(props) == 'table' and props['delivery_info']
    if type(info) == 'table' and type(props['delivery_tag']) == 'string'
        and type(info['exchange']) == 'string' and info['routing_key'] == queue then
      tag = props['delivery_tag']
      record = '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(queue) .. ']'
    else
      tag = ARGV[2] .. '-' .. n
      item = cjson.encode({body = hex(item), ['content-type'] = 'application/data',
                           ['content-encoding'] = 'binary', headers = {['x-ordered-tasks-raw'] = 'hex'},
                           properties = {delivery_tag = tag,
                                         delivery_info = {exchange = '', routing_key = queue}}})
      record = '[' .. item .. ',"",' .. cjson.encode(queue) .. ']'
    end
    redis.call('HSET', KEYS[count + 1], tag, record)
    redis.call('ZADD', KEYS[count + 2], string.format('%.6f', at + (n - 1) * DELIVERY_STEP), tag)
    taken[#taken + 1] = queue
    taken[#taken + 1] = item
  end
  if n >= most then break end
end
if n == 0 then return false end
return taken
""".replace("LOOK_AHEAD", str(LOOK_AHEAD)).replace("DELIVERY_STEP", repr(DELIVERY_STEP))
_FETCH_SHA = hashlib.sha1(_FETCH.encode()).hexdigest()


class ReliableChannel(kombu_redis.Channel):  # type: ignore[misc]
    """Kombu's Redis channel; once :meth:`fetch_reliably` is called, it fetches with one atomic script.

    With ``BRPOP`` a message exists only in the reply while it travels to
    the worker: if the worker dies or Redis restarts in that instant, it is
    lost (kombu issue 1733). The script moves it into kombu's unacknowledged
    hash in the same step, so a lost reply leaves it there, and the next
    owner of the partition (or this worker after it reconnects) puts it back
    at the head. The script does not block: after an empty fetch the channel
    waits :data:`IDLE_WAIT` seconds before the next one.

    It fetches only from queues with fewer than ``window`` unacknowledged
    messages on this channel (the partition's window), and gives each one
    to its key's lane (:attr:`lanes`), which starts the messages of one key
    one at a time, in the order they were fetched. Each fetch records the
    time of delivery, later than the one before it on this channel, so that
    a takeover puts a partition's unacknowledged messages back at the head
    in the order they were fetched.

    The script is sent once per connection, then called by its hash. Other
    channels of the transport (Celery's gossip, its remote control) keep
    kombu's ``BRPOP``. Every channel requeues at the head (:class:`HeadQoS`).
    """

    QoS = HeadQoS
    #: Whether this channel fetches with the script (see :meth:`fetch_reliably`).
    fetches_reliably = False
    #: Unacknowledged messages this channel holds per partition queue, at most.
    window = 1
    _lanes: Lanes | None = None
    #: Queue name -> its partition (None: not a partition queue).
    _partitions: dict[str, int | None]
    _fetched_at = 0.0
    #: The Redis connection that has been sent the script (None: send it with the next fetch).
    _script_on: Any = None
    _idle_until = 0.0
    _acks: Unanswered | None = None
    _ack_retry_at = 0.0
    #: Delivery tags whose acknowledgement could not be sent (sent again by the timer).
    _unsent: list[str] | None = None

    def fetch_reliably(self, window: int = 1) -> None:
        """Fetch with the script from now on, at most ``window`` messages per queue."""
        self.fetches_reliably = True
        self.window = max(1, window)
        self._partitions = {}

    @property
    def lanes(self) -> Lanes | None:
        """The per-key lanes of the messages this channel fetched (the task channel only)."""
        if self._lanes is None and self.fetches_reliably:
            self._lanes = new_lanes()
        return self._lanes

    def forget_window(self, queue: str, partition: int) -> None:
        """A new tenure of ``partition``: what this channel held of it went back to its queue."""
        if self._lanes is not None:
            self._lanes.drop_partition(partition)
        qos: Any = self.qos
        qos.forget_queue(queue)

    def _brpop_start(self, timeout: Any = None) -> None:
        if not self.fetches_reliably:
            return super()._brpop_start(timeout)  # type: ignore[no-any-return,misc]
        if monotonic() < self._idle_until:
            return
        channel: Any = self  # kombu is untyped
        in_window, window = channel.qos.in_window, self.window
        cycle = channel._queue_cycle.consume(len(channel.active_queues))
        queues = [q for q in cycle if in_window[q] < window]
        if not queues:
            return
        prefix = channel.global_keyprefix or ""
        names = [queue for _pri in channel.priority_steps for queue in queues]
        keys = [prefix + channel._q_for_pri(queue, pri) for pri in channel.priority_steps for queue in queues]
        keys += [prefix + channel.unacked_key, prefix + channel.unacked_index_key]
        connection = channel.client.connection
        channel._in_poll = connection
        channel._brpop_sent_at = monotonic()
        # Never earlier than the last message of the last fetch.
        self._fetched_at = max(time(), self._fetched_at + FETCH_BATCH * DELIVERY_STEP)
        free = [str(window - in_window[name]) for name in names]
        arguments = (len(keys), *keys, f"{self._fetched_at:.6f}", uuid4().hex, FETCH_BATCH, *names,
                     *self._crowded(names), *free)
        if self._script_on is connection:
            connection.send_command("EVALSHA", _FETCH_SHA, *arguments)
        else:  # Redis caches the script as it runs it
            connection.send_command("EVAL", _FETCH, *arguments)
            self._script_on = connection

    def _crowded(self, names: list[str]) -> list[str]:
        """For each queue, the keys with a full share of its window, as JSON ('' for none)."""
        lanes = self._lanes
        if lanes is None:
            return [""] * len(names)
        crowded = lanes.crowded(key_limit(self.window) + 1)  # the running one, and its share waiting
        if not crowded:
            return [""] * len(names)
        out = []
        for name in names:
            partition = self._partitions.get(name, -1)
            if partition == -1:
                partition = self._partitions[name] = get_settings().partition_of_queue(name)
            keys = crowded.get(partition) if partition is not None else None
            out.append(json.dumps(keys) if keys else "")
        return out

    def forget(self, delivery_tag: str) -> bool:
        """Delete the unacknowledged record of an acknowledged message, without waiting for Redis.

        Kombu waits a round trip, with a new client object, between the end
        of a task and the start of the next. Should the deletion get lost
        with the worker, the message comes back and the completion ledger
        recognises it.

        Returns False when Redis did not take the deletion, twice (the second
        time on a new connection). The message then stays unacknowledged
        here too, so its partition waits rather than fetching past it, and
        :meth:`send_unsent_acknowledgements` tries again every
        :data:`ACK_RETRY` seconds; both are logged.
        """
        for _attempt in (1, 2):
            try:
                self._send_forget(delivery_tag)
                return True
            except redis.RedisError as exc:
                error = exc
        metrics.acknowledgement_failed(self, delivery_tag, metrics.ACK_REDIS_ERROR)
        logger.warning("Could not acknowledge message %s on Redis (%r, twice): it stays "
                       "unacknowledged and its partition waits; trying again every %.0f s.",
                       delivery_tag, error, ACK_RETRY)
        if self._unsent is None:
            self._unsent = []
        self._unsent.append(delivery_tag)
        return False

    def _send_forget(self, delivery_tag: str) -> None:
        channel: Any = self
        if self._acks is None:
            self._acks = Unanswered(channel.pool, "acknowledgements")
        prefix = channel.global_keyprefix or ""
        self._acks.send(("ZREM", prefix + channel.unacked_index_key, delivery_tag),
                        ("HDEL", prefix + channel.unacked_key, delivery_tag))

    def send_unsent_acknowledgements(self) -> None:
        """Send again the acknowledgements Redis did not take (event loop, from a timer)."""
        if not self._unsent or monotonic() < self._ack_retry_at:
            return
        self._ack_retry_at = monotonic() + ACK_RETRY
        channel: Any = self
        while self._unsent:
            tag = self._unsent[0]
            try:
                self._send_forget(tag)
            except redis.RedisError as exc:
                logger.warning("Still cannot acknowledge message %s on Redis: %r", tag, exc)
                return
            del self._unsent[0]
            channel.qos.acknowledged(tag)
            logger.warning("Acknowledged message %s on Redis at a later attempt; its partition "
                           "goes on.", tag)

    def flush_acknowledgements(self) -> None:
        """Wait until Redis has applied the acknowledgements sent so far."""
        if self._acks is not None:
            self._acks.flush()

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError):  # the connection is reset
            self.flush_acknowledgements()
        super().close()

    def _brpop_read(self, **options: Any) -> Any:
        try:
            if self.fetches_reliably:
                return self._read_fetched(**options)
            return _read_reply(self, **options)
        except redis.exceptions.NoScriptError:  # Redis restarted or flushed its scripts: nothing ran
            self._script_on = None
            raise Empty() from None
        except Empty:
            if self.fetches_reliably:
                self._idle_until = monotonic() + IDLE_WAIT
            raise


    def _read_fetched(self, **options: Any) -> bool:
        """Read the script's reply and hand on each message it took, in order (kombu's read, for several)."""
        channel: Any = self
        try:
            try:
                reply = channel.client.parse_response(channel.client.connection, "EVALSHA", **options)
            except channel.connection_errors:
                channel.client.connection.disconnect()  # the next fetch reconnects
                raise
            if not reply:
                raise Empty()
            for queue, item in zip(reply[::2], reply[1::2], strict=True):
                queue = bytes_to_str(queue)
                channel._queue_cycle.rotate(queue)
                channel.connection._deliver(loads(bytes_to_str(item)), queue)
            return True
        finally:
            channel._in_poll = None
            reauthenticate = getattr(channel, "_flush_brpop_reauth", None)  # kombu 5.7
            if reauthenticate is not None:
                reauthenticate()


class ReliableSentinelChannel(ReliableChannel, kombu_redis.SentinelChannel):  # type: ignore[misc]
    """The reliable fetch on a channel that finds its Redis master through Sentinel."""


def start_fetching_reliably(channel: Any, timer: Any, window: int = 1) -> Any:
    """Turn on the reliable fetch of a worker's task channel, if it is one of ordered_tasks' Redis channels.

    Returns the timer entry that wakes the event loop while the channel
    waits after an empty fetch, and sends acknowledgements that Redis did
    not take again (cancel it when the consumer stops), or None when the
    channel is not a :class:`ReliableChannel` (it then keeps ``BRPOP``).
    """
    if not isinstance(channel, ReliableChannel):
        return None
    channel.fetch_reliably(window)
    # The event loop polls the channels again after every timer.
    return timer.call_repeatedly(IDLE_WAIT, channel.send_unsent_acknowledgements, priority=10)
