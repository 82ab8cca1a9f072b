"""How a message is laid out in Redis: key names, the publish and history scripts, the pub/sub payload.

The broker and the Python publisher clients (`service.publisher`) import it from here, so a message published
from a worker is byte for byte what the HTTP endpoint would have published: same Stream, same atomic step, same
payload on the live channel.
"""

from __future__ import annotations

__all__ = ["HISTORY_SCRIPT", "PUBLISH_SCRIPT", "keys_for", "publish_args"]

# KEYS: stream, live channel. ARGV: data, event, maxlen, ttl_ms, publish command.
PUBLISH_SCRIPT = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[1], 'e', ARGV[2])
local ms = tonumber(string.match(id, '^(%d+)'))
redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%.0f', ms - tonumber(ARGV[4])))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call(ARGV[5], KEYS[2], id .. '\\n' .. ARGV[2] .. '\\n' .. ARGV[1])
return id
"""

# KEYS: stream. ARGV: start (exclusive form or '-'), count.
# Returns {exists, trimmed, first id, now_ms, entries}. Streams are trimmed from the head only, so a client's id
# at or after the first retained entry has lost nothing; `trimmed` says whether anything was ever trimmed.
HISTORY_SCRIPT = """
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, '0-0', now, {}} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local length, added, first = 0, nil, '0-0'
for i = 1, #info, 2 do
  local k = info[i]
  if k == 'length' then length = info[i + 1]
  elseif k == 'entries-added' then added = info[i + 1]
  elseif k == 'first-entry' and info[i + 1] then first = info[i + 1][1] end
end
local trimmed = 1
if added ~= nil and added == length then trimmed = 0 end
return {1, trimmed, first, now, redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])}
"""


def keys_for(prefix: str, channel: str) -> tuple[str, str]:
    """(stream key, pub/sub channel) of an SSE channel, under one hash tag."""
    return f"{prefix}:{{{channel}}}:log", f"{prefix}:{{{channel}}}:live"


def publish_args(
    data: bytes, event: str | None, maxlen: int, ttl_ms: int, command: str = "PUBLISH"
) -> list[bytes | str | int]:
    """ARGV of PUBLISH_SCRIPT. The live payload is `id \\n event \\n data`; data (JSON) has no raw newline."""
    return [data, event or "", maxlen, ttl_ms, command]
