"""Webhook deliveries in Redis: which job events go to which URL, leased to one process at a time.

``P:hooks`` is a sorted set of pending deliveries by next attempt (ms);
``P:hook:<event id> <url>`` a hash holding one delivery's URL, body, attempts and
first try. New events reach the deliveries through the event stream's consumer
group (:meth:`HookQueue.read`, :meth:`HookQueue.add`); :mod:`dtsbridge.notify`
POSTs them. Every change is one Lua script below, run through the :class:`Store`
(its deadline, its 503s).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import txredisapi

from dtsbridge.lua import _NOW
from dtsbridge.model import Job
from dtsbridge.store import Store, StoreUnavailable, parse_events

# ARGV: prefix, group, event_id, body, url... ; one delivery per URL, then the event is acknowledged
HOOK_ADD = _NOW + """
local P, group, eid, body = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
for i = 5, #ARGV do
  local member = eid .. ' ' .. ARGV[i]
  local key = P .. ':hook:' .. member
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'url', ARGV[i], 'body', body, 'attempts', 0, 'first_ms', now)
    redis.call('ZADD', P .. ':hooks', 'NX', now, member)
  end
end
redis.call('XACK', P .. ':events', group, eid)
return 1
"""

# ARGV: prefix, token, lease_ms, count ; {member, url, body, attempts, first_ms, ...}
HOOK_TAKE = _NOW + """
local P, token, lease, count = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local due = redis.call('ZRANGEBYSCORE', P .. ':hooks', '-inf', now, 'LIMIT', 0, count)
local out = {}
for _, member in ipairs(due) do
  local key = P .. ':hook:' .. member
  local h = redis.call('HMGET', key, 'url', 'body', 'attempts', 'first_ms')
  if not h[1] then
    redis.call('ZREM', P .. ':hooks', member)
  else
    redis.call('ZADD', P .. ':hooks', 'XX', now + lease, member)
    redis.call('HSET', key, 'taker', token)
    for _, v in ipairs({member, h[1], h[2], h[3], h[4]}) do table.insert(out, v) end
  end
end
return out
"""

# ARGV: prefix, member, token, delay_ms, error ; a delivery's taker reports: delivered or given
# up (delay_ms < 0: it is forgotten), or failed (tried again delay_ms from now). 1, or 0 when
# the delivery is not (or no longer) this taker's.
HOOK_SETTLE = _NOW + """
local P, member = ARGV[1], ARGV[2]
local key, hooks = P .. ':hook:' .. member, P .. ':hooks'
if redis.call('HGET', key, 'taker') ~= ARGV[3] then return 0 end
local delay = tonumber(ARGV[4])
if delay < 0 then
  redis.call('DEL', key)
  redis.call('ZREM', hooks, member)
  return 1
end
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('HSET', key, 'last_error', ARGV[5])
redis.call('HDEL', key, 'taker')
redis.call('ZADD', hooks, 'XX', now + delay, member)
return 1
"""


class Delivery(NamedTuple):
    """A due delivery, leased to its taker."""

    member: str
    url: str
    body: str
    attempts: int
    first_ms: int  # its first try (ms, Redis clock)


class HookQueue:
    """The pending webhook deliveries of one :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def group(self, group: str, start_id: str = "$") -> None:
        """Make the consumer group that turns events after ``start_id`` into deliveries (once; later calls keep it)."""
        try:
            await self.store.call(self.store.redis.execute_command("XGROUP", "CREATE", self.store.events_key, group,
                                                                   start_id, "MKSTREAM"))
        except (txredisapi.ResponseError, StoreUnavailable) as e:
            if "BUSYGROUP" not in str(e):  # (Store.call takes BUSYGROUP for Redis's BUSY)
                raise

    async def read(self, group: str, consumer: str, count: int = 100,
                   stale_ms: int | None = None) -> list[tuple[str, Job | None]]:
        """New events for the group (or, with ``stale_ms``, those a consumer took and never acknowledged)."""
        call, redis, key = self.store.call, self.store.redis, self.store.events_key
        if stale_ms is not None:
            r = await call(redis.execute_command("XAUTOCLAIM", key, group, consumer, str(stale_ms), "0-0",
                                                 "COUNT", str(count)))
            entries = r[1] if r else []
        else:
            r = await call(redis.execute_command("XREADGROUP", "GROUP", group, consumer, "COUNT", str(count),
                                                 "STREAMS", key, ">"))
            if not r:
                return []
            entries = r[0][1] if isinstance(r, list) else next(iter(r.values()))
        out: list[tuple[str, Job | None]] = []
        parsed = dict(parse_events([e for e in entries or [] if e and e[1]]))
        for entry in entries or []:
            if entry:
                out.append((entry[0], parsed.get(entry[0])))
        return out

    async def add(self, group: str, event_id: str, body: str, urls: list[str]) -> None:
        """Queue one delivery of ``body`` per URL and acknowledge the event, in one step."""
        await self.store.eval(HOOK_ADD, [], [group, event_id, body, *urls])

    async def take(self, token: str, lease_ms: int, count: int) -> list[Delivery]:
        """Due deliveries, each leased to ``token`` for ``lease_ms``."""
        r: list[Any] = await self.store.eval(HOOK_TAKE, [], [token, str(lease_ms), str(count)]) or []
        return [Delivery(str(r[i]), str(r[i + 1]), str(r[i + 2]), int(r[i + 3]), int(r[i + 4]))
                for i in range(0, len(r), 5)]

    async def done(self, member: str, token: str) -> bool:
        """Delivered: forget it. False when it is not (or no longer) this taker's."""
        return bool(await self.store.eval(HOOK_SETTLE, [], [member, token, "-1", ""]))

    async def retry(self, member: str, token: str, delay_ms: int, error: str) -> bool:
        """A failed attempt: try again ``delay_ms`` from now (``delay_ms`` < 0: give up, forget it).
        False when it is not (or no longer) this taker's."""
        return bool(await self.store.eval(HOOK_SETTLE, [], [member, token, str(delay_ms), error[:500]]))

    async def pending(self) -> int:
        """Deliveries waiting, in all processes."""
        return int(await self.store.call(self.store.redis.zcard(self.store.key("hooks"))) or 0)
