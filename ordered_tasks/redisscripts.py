"""Redis keys and Lua of the worker and the purge command: leases, popped messages, messages set aside."""

from __future__ import annotations

from collections.abc import Iterable

from kombu.utils.encoding import bytes_to_str

#: Renew a lease: KEYS[1] the lease, ARGV its owner and the time to live in ms (0: not held).
RENEW_LEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

#: Release a lease: KEYS[1] the lease, ARGV[1] its owner (0: not held).
RELEASE_LEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

#: The Lua function ``record(item, message, queue, tag, unacked, index, score)``, for a script
#: that pops messages: it records ``item`` (``message``, its decoded JSON, or nil) popped from
#: ``queue`` as kombu's unacknowledged message, in the hash ``unacked`` and the index ``index``
#: with ``score``, and returns its delivery tag and the item as it is to be delivered.
#:
#: Nothing may fail after the pop (a script's writes are not undone): an item that is not a
#: kombu message for this queue (no delivery tag, no delivery info, another queue's routing
#: key, not JSON at all) is wrapped, hex-encoded, into a message with the tag ``tag`` and no
#: headers, which the worker parks as invalid.
RECORD_POPPED = """
local function hex(text)
  return (string.gsub(text, '.', function(c) return string.format('%02x', string.byte(c)) end))
end
local function record(item, message, queue, tag, unacked, index, score)
  local entry
  local props = type(message) == 'table' and message['properties']
  local info = type(props) == 'table' and props['delivery_info']
  if type(info) == 'table' and type(props['delivery_tag']) == 'string'
      and type(info['exchange']) == 'string' and info['routing_key'] == queue then
    tag = props['delivery_tag']
    entry = '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(queue) .. ']'
  else
    item = cjson.encode({body = hex(item), ['content-type'] = 'application/data',
                         ['content-encoding'] = 'binary', headers = {['x-ordered-tasks-raw'] = 'hex'},
                         properties = {delivery_tag = tag,
                                       delivery_info = {exchange = '', routing_key = queue}}})
    entry = '[' .. item .. ',"",' .. cjson.encode(queue) .. ']'
  end
  redis.call('HSET', unacked, tag, entry)
  redis.call('ZADD', index, score, tag)
  return tag, item
end
"""

#: The prefix of the Redis keys that hold the messages a worker set aside (kombu's global key
#: prefix goes before it). A partition queue's messages of a key that has its share of the
#: window are moved, in their order, to the key's own list, so that the queue's other keys
#: behind them are reached; the key is served from that list first (see the worker's fetch).
ASIDE_PREFIX = "ordered_tasks:aside:"


def aside_index(queue: str) -> str:
    """The set of the keys of ``queue`` that have messages set aside."""
    return f"{ASIDE_PREFIX}{queue}"


def aside_list(queue: str, key: str) -> str:
    """The list of the messages of ``key`` set aside from ``queue`` (its head at the right, as a queue's)."""
    return f"{ASIDE_PREFIX}{queue}:{key}"


def aside_lists(keys: Iterable[bytes | str], queue: str, prefix: str = "") -> dict[str, str]:
    """Each of ``keys`` (the members of :func:`aside_index`, as Redis gives them) -> its list, by key."""
    return {key: prefix + aside_list(queue, key) for key in sorted(map(bytes_to_str, keys))}


#: Put a message back at the head of its key's messages: KEYS[1] the key's list of messages
#: set aside, KEYS[2] the queue (list) it came from; ARGV[1] the message. While the key has
#: messages set aside, they are all later than this one, so it goes before them; else it
#: goes to the head of the queue.
PUT_BACK = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('RPUSH', KEYS[1], ARGV[1])
end
return redis.call('RPUSH', KEYS[2], ARGV[1])
"""

#: Move a delivered message behind its key's messages set aside, if the key has some: KEYS[1]
#: kombu's unacked hash, KEYS[2] its index, KEYS[3] the key's list, KEYS[4] the queue's set of
#: keys with messages set aside; ARGV[1] the delivery tag, ARGV[2] the message and ARGV[3] its
#: unacknowledged record, both with the key as their ``ordered_key`` header, ARGV[4] the key.
#: Returns :data:`JOINED_MOVED` (its record is gone), :data:`JOINED_STAYED` (its record now
#: names its key), or :data:`JOINED_GONE` (it had no record: no longer the caller's).
JOIN_ASIDE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 2 end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[4])
return 1
"""
JOINED_STAYED, JOINED_MOVED, JOINED_GONE = 0, 1, 2
