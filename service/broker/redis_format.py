"""How the service lays things out in Redis: key names, every Lua script, the pub/sub payload.

The broker and the Python publisher clients (`service.publisher`) import it from here, so a message published
from a worker is byte for byte what the HTTP endpoint would have published: same Stream, same atomic step, same
payload on the live channel.

Per SSE channel `room`, all under one hash tag so they share a Cluster slot:
- `sse:{room}:log`   the Stream (history; entry id = message id), trimmed by count and age, expiring with it;
- `sse:{room}:meta`  a hash: `e` the history's epoch, `t` the last id ever added, `l` the last id of a stream
                     that expired while the meta lived on. It outlives the Stream (HISTORY_META_TTL), so a
                     client resuming after everything expired is told it missed something instead of silence;
                     when it is gone too (flush, restart without persistence) a new epoch starts;
- `sse:{room}:live`  the pub/sub channel (payload `id \\n event \\n data`);
- `sse:{room}:idem:<key>`  a publish's id, kept IDEMPOTENCY_TTL, so a retry with the same key returns it;
- `sse:{room}:idemf:<key>`  the fingerprint of that publish (event and data), kept as long: the same key with
                     another body is refused (`IdempotencyKeyReused`, 422) instead of answered with the first id.
                     A separate key, not a suffix of the id's value, so publishers of an older release still read
                     the id; a record without it (written by one of those) is taken as matching.

An idempotency key is scoped to its channel (it lives under the channel's hash tag, so the check stays inside
the one atomic step on a Cluster too): the same key on another channel is another publish.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = [
    "HISTORY_META_SCRIPT",
    "PRESENCE_COUNT_SCRIPT",
    "PRESENCE_REPORT_SCRIPT",
    "RATE_SCRIPT",
    "PUBLISH_SCRIPT",
    "TAIL_SCRIPT",
    "idempotency_key",
    "keys_for",
    "meta_key",
    "parse_history_meta",
    "publish_args",
    "publish_fingerprint",
    "publish_keys",
]

# GCRA on Redis's clock: `key` holds the client's theoretical arrival time (µs); `wait` is 0 when the charge is
# taken, else the microseconds to wait (nothing is charged then). One body for both scripts that charge a rate.
def _gcra(key: str, interval: str, tolerance: str, cost: str) -> str:
    return f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber({interval})
local tolerance = tonumber({tolerance})
local tat = tonumber(redis.call('GET', {key}) or '0')
if tat < now then tat = now end
local new_tat = tat + interval * tonumber({cost})
local excess = new_tat - now - tolerance
local wait = 0
if excess > 0 and tat > now then
  wait = math.ceil(math.min(excess, tat - now))
else
  redis.call('SET', {key}, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
end
"""


RATE_SCRIPT = _gcra("KEYS[1]", "ARGV[1]", "ARGV[2]", "ARGV[3]") + "return wait\n"


# KEYS: stream, live, meta, idempotency key, its fingerprint, the publisher's rate key (the stream's key when no
# rate is charged). ARGV: data, event, maxlen, ttl_ms, meta_ttl_ms, publish command, idempotency ttl_ms ("0": no
# key), fingerprint, and the rate charged in the same step (interval µs, tolerance µs, cost; "" for none: the
# rate limiter is then asked on its own, or not at all). Returns {full id, 0}, or for a key seen before {its first
# id, 1} (a repeat) or {its first id, 2} (the key reused with another body: nothing published), or {µs to wait, 3}
# (over the publisher's rate: nothing published, nothing charged).
PUBLISH_SCRIPT = """
if ARGV[9] ~= '' then""" + _gcra("KEYS[6]", "ARGV[9]", "ARGV[10]", "ARGV[11]") + """
  if wait > 0 then return {tostring(wait), 3} end
end
if ARGV[7] ~= '0' then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    local print = redis.call('GET', KEYS[5])
    if print and print ~= ARGV[8] then return {seen, 2} end
    return {seen, 1}
  end
end
local meta = redis.call('HMGET', KEYS[3], 'e', 't')
local epoch, top = meta[1], meta[2]
if not epoch then
  local t = redis.call('TIME')
  local n = ((tonumber(t[1]) % 2821109) * 1000000 + tonumber(t[2])) % 2821109907456
  local digits, s = '0123456789abcdefghijklmnopqrstuvwxyz', ''
  for _ = 1, 8 do
    local d = n % 36
    s = string.sub(digits, d + 1, d + 1) .. s
    n = math.floor(n / 36)
  end
  epoch = s
  redis.call('HSET', KEYS[3], 'e', epoch)
elseif top and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[3], 'l', top)
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[1], 'e', ARGV[2])
local ms = tonumber(string.match(id, '^(%d+)'))
redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%.0f', ms - tonumber(ARGV[4])))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('HSET', KEYS[3], 't', id)
redis.call('PEXPIRE', KEYS[3], ARGV[5])
local full = id .. '-' .. epoch
redis.call(ARGV[6], KEYS[2], full .. '\\n' .. ARGV[2] .. '\\n' .. ARGV[1])
if ARGV[7] ~= '0' then
  redis.call('SET', KEYS[4], full, 'PX', ARGV[7])
  redis.call('SET', KEYS[5], ARGV[8], 'PX', ARGV[7])
end
return {full, 0}
"""

# KEYS: stream, meta. Returns {epoch, top, lost, exists, trimmed, first}; '' for what is unknown.
# Read right AFTER the page's own XRANGE, in the same pipeline (Redis runs one connection's commands in order):
# entries trimmed in between can only make the verdict stricter (a needless reset), never hide a gap. The page
# itself is a plain XRANGE with COUNT: no Lua copy of megabytes, and a bounded slice of Redis's time.
HISTORY_META_SCRIPT = """
local meta = redis.call('HMGET', KEYS[2], 'e', 't', 'l')
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {meta[1] or '', meta[2] or '', meta[3] or '', 0, 0, ''}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local length, added, first, last = 0, nil, '', ''
for i = 1, #info, 2 do
  local k = info[i]
  if k == 'length' then length = info[i + 1]
  elseif k == 'entries-added' then added = info[i + 1]
  elseif k == 'last-generated-id' then last = info[i + 1]
  elseif k == 'first-entry' and info[i + 1] then first = info[i + 1][1] end
end
local trimmed = 1
if added ~= nil and added == length then trimmed = 0 end
return {meta[1] or '', meta[2] or last, meta[3] or '', 1, trimmed, first}
"""

# KEYS: stream, meta. Returns {epoch, top}: where a channel's history stands ('' when it has none).
TAIL_SCRIPT = """
local meta = redis.call('HMGET', KEYS[2], 'e', 't')
if meta[1] then return {meta[1], meta[2] or ''} end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then return {'', last[1][1]} end
return {'', ''}
"""


# Presence (service/presence.py). KEYS: zset, hash of each channel reported, in pairs. ARGV: instance, ttl_ms, then
# each channel's count, in the order of KEYS. One call reports a batch of channels that share a node and slot.
PRESENCE_REPORT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for i = 1, #KEYS / 2 do
  local presence, counts, count = KEYS[2 * i - 1], KEYS[2 * i], ARGV[i + 2]
  if tonumber(count) > 0 then
    redis.call('ZADD', presence, now + ttl, ARGV[1])
    redis.call('HSET', counts, ARGV[1], count)
    redis.call('PEXPIRE', presence, ttl)
    redis.call('PEXPIRE', counts, ttl)
  else
    redis.call('ZREM', presence, ARGV[1])
    redis.call('HDEL', counts, ARGV[1])
  end
end
return #KEYS / 2
"""

# KEYS: zset, hash. Returns {total subscribers, live instances}; forgets expired instances on the way.
PRESENCE_COUNT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, m in ipairs(dead) do redis.call('HDEL', KEYS[2], m) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
local total = 0
for _, m in ipairs(live) do total = total + tonumber(redis.call('HGET', KEYS[2], m) or '0') end
return {total, #live}
"""

# The publish rate limit (service/ratelimit.py): a GCRA on Redis's clock.


def keys_for(prefix: str, channel: str) -> tuple[str, str]:
    """(stream key, pub/sub channel) of an SSE channel, under one hash tag."""
    return f"{prefix}:{{{channel}}}:log", f"{prefix}:{{{channel}}}:live"


def meta_key(prefix: str, channel: str) -> str:
    return f"{prefix}:{{{channel}}}:meta"


def idempotency_key(prefix: str, channel: str, key: str | None) -> str:
    return f"{prefix}:{{{channel}}}:idem:{key or ''}"


def publish_keys(prefix: str, channel: str, key: str | None, rate_key: str | None = None) -> list[str]:
    """KEYS of PUBLISH_SCRIPT. `rate_key`: the publisher's, when its rate is charged in the same step (never on a
    Cluster: it is in another slot)."""
    stream, live = keys_for(prefix, channel)
    return [stream, live, meta_key(prefix, channel), idempotency_key(prefix, channel, key),
            f"{prefix}:{{{channel}}}:idemf:{key or ''}", rate_key or stream]


def publish_fingerprint(event: str | None, data: bytes) -> str:
    """What makes two publishes under one idempotency key the same request: the event name and the encoded data
    (the channel is in the key). A 128-bit BLAKE2b, computed only for publishes that carry a key."""
    return hashlib.blake2b(b"%s\n%s" % ((event or "").encode(), data), digest_size=16).hexdigest()


def publish_args(data: bytes, event: str | None, maxlen: int, ttl_ms: int, meta_ttl_ms: int,
                 command: str = "PUBLISH", idempotency_ttl_ms: int = 0,
                 rate: tuple[str, str, int] | None = None) -> list[bytes | str | int]:
    """ARGV of PUBLISH_SCRIPT. The live payload is `id \\n event \\n data`; data (JSON) has no raw newline. `rate`:
    (interval µs, tolerance µs, cost) charged in the same step, or None."""
    fingerprint = publish_fingerprint(event, data) if idempotency_ttl_ms else ""
    return [data, event or "", maxlen, ttl_ms, max(meta_ttl_ms, ttl_ms), command, idempotency_ttl_ms, fingerprint,
            *(rate or ("", "", 0))]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_history_meta(raw: list[Any]) -> tuple[str, str, str, bool, bool, str]:
    """HISTORY_META_SCRIPT's reply as (epoch, top, lost, exists, trimmed, first)."""
    epoch, top, lost, exists, trimmed, first = raw
    return _text(epoch), _text(top), _text(lost), bool(int(exists)), bool(int(trimmed)), _text(first)
