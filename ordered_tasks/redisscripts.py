"""Lua shared by the worker and the purge command: partition leases, and recording a popped message."""

from __future__ import annotations

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
