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
from kombu.utils.json import dumps, loads

from ...conf import get_settings
from ...options import KEY_HEADER
from ...redisscripts import (
    ASIDE_PREFIX,
    JOIN_ASIDE,
    JOINED_GONE,
    JOINED_STAYED,
    PUT_BACK,
    RECORD_POPPED,
    aside_index,
    aside_list,
)
from ..health import metrics
from ..sequencing.lanes import Lanes
from ..sequencing.window import fetch_share, new_lanes, parking_room
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
#: to take, the most messages one key may have in the window (running and waiting), then
#: each queue's name (as in KEYS, without prefix and priority suffix), then for each queue a
#: JSON object of the keys it has in the window with their number of messages there ('' for
#: none), then each queue's free places, then for each queue its parking room as a JSON
#: object ``{"room": n, "keys": [...]}`` ('' for none; priority lists of one queue share
#: places, key counts and room), then the prefix of the names of the lists set aside (see
#: :func:`~ordered_tasks.redisscripts.aside_list`). Returns the queue name, delivery tag and
#: message of each message taken, in the order taken, or false.
#:
#: A key's messages set aside come first: each queue's set-aside keys are served from the
#: head of their lists while they have room in the window. Then each queue is read once
#: from its head, LOOK_AHEAD messages at most. A message whose key (its ``ordered_key``
#: header, a string) has its share in the window, counting the messages taken in this
#: call, or has messages set aside, is set aside: moved to the tail of its key's list, so
#: that the partition's other keys behind it are reached and the key's messages keep their
#: order. A message of a parking key (held: the worker parks its messages as they come) is
#: taken while there is parking room, without a place in the window. With the window full,
#: the others are looked past and stay in place, and nothing after one of them is set aside:
#: what waits aside stays older than everything in the queue, so serving it first never
#: overtakes another key. A message whose key cannot be read ends
#: the look once something was looked past (it may belong to such a key); else it is taken
#: if there is a free place, and nothing after it is set aside in this call: the worker,
#: which reads its key from its arguments, moves it behind its key's messages set aside, if
#: any (:meth:`ReliableChannel.join_set_aside`), and those must all be older than it.
#:
#: Each message is recorded by :data:`~ordered_tasks.redisscripts.RECORD_POPPED`, which
#: wraps an item that is not a kombu message of the queue for the worker to park.
_FETCH = RECORD_POPPED + """
local count = (#KEYS - 2)
local at = tonumber(ARGV[1])
local most = tonumber(ARGV[3])
local share = tonumber(ARGV[4])
local aside_prefix = ARGV[5 + 4 * count]
local free, held, room, parking, aside = {}, {}, {}, {}, {}
for i = 1, count do
  local queue = ARGV[4 + i]
  free[queue] = tonumber(ARGV[4 + 2 * count + i]) or 0
  if held[queue] == nil then
    local counts = ARGV[4 + count + i] or ''
    held[queue] = counts ~= '' and cjson.decode(counts) or {}
    local rooms = ARGV[4 + 3 * count + i] or ''
    local parked = rooms ~= '' and cjson.decode(rooms) or {}
    room[queue] = tonumber(parked['room']) or 0
    parking[queue] = {}
    for _, key in ipairs(parked['keys'] or {}) do parking[queue][key] = true end
  end
end
local taken = {}
local n = 0
local function take(queue, item, message, key, outside)
  n = n + 1
  if outside then
    room[queue] = room[queue] - 1
  else
    if key ~= nil then held[queue][key] = (held[queue][key] or 0) + 1 end
    free[queue] = free[queue] - 1
  end
  local tag
  tag, item = record(item, message, queue, ARGV[2] .. '-' .. n, KEYS[count + 1], KEYS[count + 2],
                     string.format('%.6f', at + (n - 1) * DELIVERY_STEP))
  taken[#taken + 1] = queue
  taken[#taken + 1] = tag
  taken[#taken + 1] = item
end
local function decoded(item)
  local ok, message = pcall(cjson.decode, item)
  if not ok or type(message) ~= 'table' then return nil, nil end
  local headers = message['headers']
  local key = type(headers) == 'table' and headers['ordered_key'] or nil
  if type(key) ~= 'string' then key = nil end
  return message, key
end
for i = 1, count do
  local queue = ARGV[4 + i]
  if aside[queue] == nil then
    -- The messages set aside are the earliest of their keys that wait: they go first.
    aside[queue] = {}
    local index = aside_prefix .. queue
    for _, key in ipairs(redis.call('SMEMBERS', index)) do
      local list = index .. ':' .. key
      while n < most do
        local outside = parking[queue][key] and room[queue] > 0
        if not outside and (free[queue] <= 0 or (held[queue][key] or 0) >= share) then break end
        local item = redis.call('RPOP', list)
        if not item then break end
        local message = decoded(item)
        take(queue, item, message, key, outside)
      end
      if redis.call('EXISTS', list) == 1 then
        aside[queue][key] = true
      else
        redis.call('SREM', index, key)
      end
    end
  end
end
for i = 1, count do
  local queue = ARGV[4 + i]
  if n >= most then break end
  if free[queue] > 0 or room[queue] > 0 then
    local in_window = held[queue]
    local parks = parking[queue]
    local set_aside = aside[queue]
    local items = redis.call('LRANGE', KEYS[i], -LOOK_AHEAD, -1)
    local passed, passed_keys, unkeyed = false, {}, false
    for j = #items, 1, -1 do
      if n >= most or (free[queue] <= 0 and room[queue] <= 0) then break end
      local item = items[j]
      local message, key = decoded(item)
      local action = 'take'
      if key == nil then
        if passed or free[queue] <= 0 then break end
        unkeyed = true
      elseif passed_keys[key] then
        action = 'pass'
      elseif set_aside[key] then
        -- Past a message left in place, nothing is set aside: what waits aside stays older than
        -- everything in the queue, so serving it first keeps the queue's order across keys.
        if passed then
          action = 'pass'
          passed_keys[key] = true
        else
          action = 'aside'
        end
      elseif parks[key] and room[queue] > 0 then
        action = 'outside'
      elseif free[queue] <= 0 then
        action = 'pass'
        passed = true
        passed_keys[key] = true
      elseif (in_window[key] or 0) >= share then
        action = 'aside'
      end
      -- Past a message of unknown key, nothing is set aside: it may be of that key, and the
      -- worker puts it behind its key's messages set aside, all of which must be older.
      if action == 'aside' and unkeyed then break end
      if action ~= 'pass' then
        if passed then redis.call('LREM', KEYS[i], -1, item) else redis.call('RPOP', KEYS[i]) end
        if action == 'aside' then
          local index = aside_prefix .. queue
          redis.call('LPUSH', index .. ':' .. key, item)
          redis.call('SADD', index, key)
          set_aside[key] = true
        else
          take(queue, item, message, key, action == 'outside')
        end
      end
    end
  end
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
        #: Queue -> tags of its messages that wait to hear whether they go behind their key's
        #: messages set aside (Redis did not answer): the queue is not fetched meanwhile.
        self._joining: dict[str, set[str]] = {}

    @property
    def lanes(self) -> Lanes | None:
        """The per-key lanes of the messages this channel fetched (the task channel only)."""
        if self._lanes is None and self.fetches_reliably:
            self._lanes = new_lanes()
            # A held key's messages waiting to be parked leave the window (see Lanes).
            qos: Any = self.qos
            self._lanes.release = qos.park_outside
            self._lanes.parking_room = parking_room(self.window)
        return self._lanes

    def forget_window(self, queue: str, partition: int) -> None:
        """A new tenure of ``partition``: what this channel held of it went back to its queue."""
        if self._lanes is not None:
            self._lanes.drop_partition(partition)
        if self.fetches_reliably:
            self._joining.pop(queue, None)  # those messages went back to the queue
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
        queues = [q for q in cycle if (in_window[q] < window or self._parks(q)) and q not in self._joining]
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
        arguments = (len(keys), *keys, f"{self._fetched_at:.6f}", uuid4().hex, FETCH_BATCH,
                     fetch_share(window), *names, *self._in_window(names), *free, *self._rooms(names),
                     prefix + ASIDE_PREFIX)
        if self._script_on is connection:
            connection.send_command("EVALSHA", _FETCH_SHA, *arguments)
        else:  # Redis caches the script as it runs it
            connection.send_command("EVAL", _FETCH, *arguments)
            self._script_on = connection

    def _do_restore_message(self, payload: Any, exchange: str, routing_key: str, pipe: Any,
                            leftmost: bool = False) -> None:
        """Put a message back at the head of its queue, or of its key's messages set aside if it has some.

        Those are all later than it (the fetch sets aside only a key's
        earliest messages left in the queue), so it goes before them, or a
        later message of its key would run first. Runs in kombu's restore
        transaction, which this script keeps atomic.
        """
        headers = payload.get("headers") if isinstance(payload, dict) else None
        key = headers.get(KEY_HEADER) if isinstance(headers, dict) else None
        if leftmost or not isinstance(key, str):
            return super()._do_restore_message(  # type: ignore[no-any-return,misc]
                payload, exchange, routing_key, pipe, leftmost)
        channel: Any = self
        with contextlib.suppress(KeyError, TypeError):
            payload["headers"]["redelivered"] = True
            payload["properties"]["delivery_info"]["redelivered"] = True
        prefix = channel.global_keyprefix or ""
        for queue in channel._lookup(exchange, routing_key):
            target = channel._q_for_pri(queue, channel._get_message_priority(payload, reverse=False))
            pipe.execute_command("EVAL", PUT_BACK, 2, prefix + aside_list(queue, key), prefix + target,
                                 dumps(payload))
        return None

    def join_set_aside(self, message: Any, key: str) -> bool | None:
        """Move a delivered message behind its key's messages set aside, if the key has some.

        For a message whose key the fetch could not read (no ``ordered_key``
        header: another producer), which the worker reads from its
        arguments: the fetch may have taken it past its key's messages set
        aside, which are older (it sets nothing aside after such a message),
        so it must wait behind them. It gets its key as its header, in its
        unacknowledged record too, in one step: a message put back later (a
        requeue in place, a takeover) then goes where its key's do, and one
        that comes back from its key's list is not moved again.

        Returns True when it moved (or its record is no longer this worker's:
        a new tenure put it back), False when the key has nothing set aside
        (the caller admits it), and None when Redis did not answer: the
        message's queue is then not fetched until every such question about
        its messages is answered, so that nothing newer of its key is set
        aside before it.
        """
        channel: Any = self
        queue = (message.delivery_info or {}).get("routing_key")
        if not isinstance(queue, str):
            return False
        prefix = channel.global_keyprefix or ""
        tag = message.delivery_tag
        try:
            with channel.conn_or_acquire() as client:
                raw = client.hget(channel.unacked_key, tag)
                if raw is None:
                    outcome = JOINED_GONE
                else:
                    payload, exchange, routing_key = loads(bytes_to_str(raw))
                    payload = _with_key(payload, key)
                    keys = (prefix + channel.unacked_key, prefix + channel.unacked_index_key,
                            prefix + aside_list(queue, key), prefix + aside_index(queue))
                    outcome = int(client.execute_command("EVAL", JOIN_ASIDE, 4, *keys, tag, dumps(payload),
                                                         dumps([payload, exchange, routing_key]), key))
        except redis.RedisError as exc:
            waiting = self._joining.setdefault(queue, set())
            if not waiting:
                logger.warning("Could not tell whether message %s must wait behind the messages of its "
                               "key set aside (%r): queue %s is not fetched until Redis answers.",
                               tag, exc, queue)
            waiting.add(tag)
            return None
        pending = self._joining.get(queue)
        if pending is not None:
            pending.discard(tag)
            if not pending:
                del self._joining[queue]
                logger.warning("Redis answers again: queue %s is fetched again.", queue)
        if outcome != JOINED_STAYED:
            channel.qos.moved_away(tag)
        return outcome != JOINED_STAYED

    def _partition_of(self, name: str) -> int | None:
        partition = self._partitions.get(name, -1)
        if partition == -1:
            partition = self._partitions[name] = get_settings().partition_of_queue(name)
        return partition

    def _in_window(self, names: list[str]) -> list[str]:
        """For each queue, its keys' numbers of messages in the window, as a JSON object ('' for none)."""
        lanes = self._lanes
        out = []
        for name in names:
            partition = self._partition_of(name)
            counts = lanes.key_counts(partition) if lanes is not None and partition is not None else None
            out.append(json.dumps(counts) if counts else "")
        return out

    def _parks(self, name: str) -> bool:
        """Whether ``name`` has held keys whose messages the fetch may take outside the window."""
        lanes, partition = self._lanes, self._partition_of(name)
        return lanes is not None and partition is not None and lanes.parking(partition)[0] > 0

    def _rooms(self, names: list[str]) -> list[str]:
        """For each queue, its parking room and keys as a JSON object ('' for none)."""
        lanes = self._lanes
        out = []
        for name in names:
            partition = self._partition_of(name)
            room, keys = lanes.parking(partition) if lanes is not None and partition is not None else (0, [])
            out.append(json.dumps({"room": room, "keys": keys}) if room and keys else "")
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
        """Read the script's reply and hand on each message it took, in order (kombu's read, for several).

        A message of a queue no longer consumed here (its consumer was
        cancelled while the reply travelled: a lease lost, a shutdown) is
        left as it is, recorded as unacknowledged: the partition's next
        tenure puts it back at the head with the rest, in the order fetched.
        Kombu would requeue each at the head in turn, reversing the batch.
        """
        channel: Any = self
        try:
            try:
                reply = channel.client.parse_response(channel.client.connection, "EVALSHA", **options)
            except channel.connection_errors:
                channel.client.connection.disconnect()  # the next fetch reconnects
                raise
            if not reply:
                raise Empty()
            consumed = channel.connection._callbacks
            for queue, tag, item in zip(reply[::3], reply[1::3], reply[2::3], strict=True):
                queue = bytes_to_str(queue)
                if queue not in consumed:
                    continue
                channel._queue_cycle.rotate(queue)
                channel.connection._deliver(_message_of(bytes_to_str(item), bytes_to_str(tag), queue), queue)
            return True
        finally:
            channel._in_poll = None
            reauthenticate = getattr(channel, "_flush_brpop_reauth", None)  # kombu 5.7
            if reauthenticate is not None:
                reauthenticate()


def _with_key(payload: Any, key: str) -> Any:
    """The message, with its key (read from its arguments) as its ``ordered_key`` header.

    It goes behind its key's messages set aside; when it comes back from
    there, the header tells the fetch and the worker its key, so it is not
    moved again.
    """
    headers = payload.get("headers") if isinstance(payload, dict) else None
    if isinstance(headers, dict):
        headers[KEY_HEADER] = key
    return payload


def _message_of(item: str, tag: str, queue: str) -> dict[str, Any]:
    """The kombu message of a fetched item; one that Redis could read and Python cannot is handed on raw.

    (Redis's JSON parser accepts some texts that Python's refuses.) The
    worker parks such a message as invalid, under the tag it was recorded with.
    """
    try:
        message = loads(item)
        if isinstance(message, dict):
            return message
    except ValueError:
        pass
    return {"body": item.encode().hex(), "content-type": "application/data", "content-encoding": "binary",
            "headers": {"x-ordered-tasks-raw": "hex"},
            "properties": {"delivery_tag": tag, "delivery_info": {"exchange": "", "routing_key": queue}}}


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
