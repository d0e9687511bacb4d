"""The Redis store: every job's durable state, the work queue and its leases.

Layout (``P`` is ``[redis] key_prefix``, ``dtsbridge`` by default):

- ``P:job:<id>``      hash: the job (see :mod:`dtsbridge.model`)
- ``P:jobs``          sorted set: every job id by creation time (ms)
- ``P:queue``         list: jobs waiting for a worker (LPUSH new, RPOP to claim)
- ``P:active``        sorted set: claimed jobs by lease deadline (ms, Redis clock)
- ``P:staging``       sorted set: jobs in STAGING by staging deadline (ms)
- ``P:deadlines``     sorted set: jobs with a ``timeout_seconds`` by deadline (ms)
- ``P:user_active``   hash: target user -> number of their claimed (running) jobs,
  for ``[copy] max_jobs_per_user``
- ``P:folder:<user>:<folder>``  string: the job that owns "copy this folder for
  this user"; a repeat of the request finds it here
- ``P:watched:<folder>``  string: the watcher has taken this folder (SET NX); once its
  job exists, the job id, kept for ``WATCH_MARK_MS`` (at least the retention) and renewed
  while the folder is still in the DTS area, so the folder is never delivered twice
- ``P:expiring``      sorted set: ended jobs by the time they are forgotten (ms)
- ``P:events``        stream: every job change (see :data:`_EVENTS`), kept for ``EVENT_KEEP_MS``;
  its consumer group ``webhooks`` turns events into webhook deliveries
- ``P:hooks``         sorted set: pending webhook deliveries by next attempt (ms);
  ``P:hook:<event id> <url>`` hash: a delivery's body, URL, attempts, first try

Retention: when a job ends and no worker holds it any more, the script that
ends it gives its hash and its folder key (if it still names it) a ``PEXPIRE``
of the job's ``retain_ms`` (``[state]
retention_days``, recorded at creation) and adds it to ``P:expiring``;
:meth:`Store.trim` (every housekeeping tick) then drops the index entries
(``P:jobs``, ``P:expiring``) of jobs whose time is up. Redis memory is thus
bounded by the jobs of the retention period plus the live ones.

Every change that must be atomic is a Lua script, and every script reads the
time from Redis (``TIME``) so hosts with skewed clocks agree on leases and
deadlines. A worker holds a job through a *claim token* stored on the job:
heartbeats, the publish fence and the final state are refused once the claim
has moved on, so a stale worker can never publish twice or overwrite a newer
state (asynq's pending list / active set / recoverer design).

Every call carries a deadline: txredisapi waits forever while Redis is down,
so a call that does not answer in ``timeout`` seconds fails with
:class:`StoreUnavailable`, which the web layer turns into 503.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any, Iterable

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dtsbridge.model import Job

# Reconnect quickly after a Redis restart (the library's default backs off to 10 s).
txredisapi.RedisFactory.maxDelay = 2
txredisapi.RedisFactory.initialDelay = 0.2


class StoreUnavailable(Exception):
    """Redis did not answer in time, or the connection is down."""


_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

DEFAULT_RETAIN_MS = 30 * 86400 * 1000
#: the least time a watcher's mark of a done folder lives without renewal (see _WATCHED_DONE)
WATCH_MARK_MS = 30 * 86400 * 1000

# Job events. Every script that changes a job calls emit(P, id) in the same
# script, so the stream ``P:events`` can never miss or invent a change: one entry
# per change, holding ``job_id`` and the job's fields (secrets left out). The
# stream is trimmed by age (``MINID``; stream ids are milliseconds), never by count.
EVENT_KEEP_MS = 25 * 3600 * 1000  # at least 24 hours of events


def _events_lua() -> str:
    from dtsbridge.model import SECRET_FIELDS
    secret = ", ".join(f"[{f!r}] = true" for f in sorted(SECRET_FIELDS))
    return """
local EVENT_SECRET = {%s}
local function emit(P, id)
  local key = P .. ':job:' .. id
  local h = redis.call('HGETALL', key)
  if #h == 0 then return end
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local args = {'XADD', P .. ':events', 'MINID', '~', tostring(ms - %d), '*', 'job_id', id}
  for i = 1, #h, 2 do
    if not EVENT_SECRET[h[i]] then
      args[#args + 1] = h[i]
      args[#args + 1] = h[i + 1]
    end
  end
  redis.call(unpack(args))
end
""" % (secret, EVENT_KEEP_MS)


_EVENTS = _events_lua()

# Retention (needs _NOW): a job that has ended and that no worker holds any more is
# forgotten ``retain_ms`` (a field set at creation) from now, together with the keys
# that still name it. A job that ended while a worker still holds its claim (a
# cancelled copy) is scheduled when that claim is dropped (finish, release, recover).
_FORGET = """
local function forget_later(P, id, key, default_ms)
  local st = redis.call('HGET', key, 'status')
  if st ~= 'SUCCESS' and st ~= 'ERROR' and st ~= 'CANCELLED' then return end
  if redis.call('HEXISTS', key, 'claim') == 1 then return end
  local ms = tonumber(redis.call('HGET', key, 'retain_ms') or '') or default_ms or %d
  if ms < 1 then ms = 1 end
  redis.call('PEXPIRE', key, ms)
  local k = redis.call('HGET', key, 'folder_key')
  if k and redis.call('GET', k) == id then redis.call('PEXPIRE', k, ms) end
  redis.call('ZADD', P .. ':expiring', now + ms, id)
end
""" % DEFAULT_RETAIN_MS

# ARGV: prefix, job_id, enqueue, field1, value1, ... ; KEYS: folder key or ''
# enqueue: '1' queue it, '0' not, 'staging:<ms>' a STAGING job whose deadline is
# registered in the same step (a job can never wait for a stager without one).
_CREATE = _NOW + _FORGET + _EVENTS + """
local P, id, enqueue = ARGV[1], ARGV[2], ARGV[3]
local folder = KEYS[1]
local key = P .. ':job:' .. id
if folder ~= '' then
  local existing = redis.call('GET', folder)
  if existing then
    local st = redis.call('HGET', P .. ':job:' .. existing, 'status')
    if st and st ~= 'ERROR' and st ~= 'CANCELLED' then
      return {0, existing}
    end
  end
  redis.call('SET', folder, id)
  redis.call('HSET', key, 'folder_key', folder)
end
if string.sub(enqueue, 1, 8) == 'staging:' then
  redis.call('ZADD', P .. ':staging', now + tonumber(string.sub(enqueue, 9)), id)
end
for i = 4, #ARGV, 2 do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', P .. ':jobs', now, id)
-- a per-request timeout_seconds: the job ends in ERROR 'timeout' unless it ends before
local limit = tonumber(redis.call('HGET', key, 'timeout_seconds') or '')
if limit then
  redis.call('ZADD', P .. ':deadlines', now + math.floor(limit * 1000), id)
end
if enqueue == '1' then
  redis.call('LPUSH', P .. ':queue', id)
end
emit(P, id)
forget_later(P, id, key)
return {1, id}
"""

# Per-user running jobs: ``P:user_active`` maps a target user to the number of
# their jobs that hold a claim. A claim counts its job once (the job's
# ``active_user`` field says it is counted); every script that drops a claim
# (finish, release, recover) uncounts it through _UNCOUNT.
_UNCOUNT = """
local function uncount(P, key)
  local u = redis.call('HGET', key, 'active_user')
  if u then
    redis.call('HDEL', key, 'active_user')
    if redis.call('HINCRBY', P .. ':user_active', u, -1) <= 0 then
      redis.call('HDEL', P .. ':user_active', u)
    end
  end
end
"""

# Shared by release and recovery (needs _NOW, _UNCOUNT, _FORGET, _EVENTS): drop a job's claim; a
# job still queued or copying goes back to the queue. Its publish record (``publishing``,
# ``publish_*``) stays: the attempt that held it may have published, so a cancel is still
# refused and the next attempt looks for that folder before copying. Returns true when
# the job was requeued; an ended job is scheduled to be forgotten instead.
_REQUEUE = """
local function requeue(P, id, key, detail)
  redis.call('ZREM', P .. ':active', id)
  redis.call('HDEL', key, 'claim')
  uncount(P, key)
  local st = redis.call('HGET', key, 'status')
  if st == 'TRANSFERRING' or st == 'SUBMITTED' then
    redis.call('HSET', key, 'status', 'SUBMITTED', 'detailed_status', detail)
    redis.call('RPUSH', P .. ':queue', id)
    emit(P, id)
    return true
  end
  redis.call('HDEL', key, 'publishing')
  forget_later(P, id, key)
  return false
end
"""

# ARGV: prefix, token, holder, lease_ms, iso_now, per_user_limit (0: none), max_scan ;
# returns job_id or false. The oldest job (the tail of the queue) whose user is
# below the limit is taken; jobs of users at their limit stay queued in order.
_CLAIM = _NOW + _UNCOUNT + _EVENTS + """
local P, token, holder, lease, iso = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local limit, max_scan = tonumber(ARGV[6] or '0'), tonumber(ARGV[7] or '1000')
local q = P .. ':queue'
local function take(id, key)
  redis.call('ZADD', P .. ':active', now + lease, id)
  redis.call('HSET', key, 'claim', token, 'lease_host', holder, 'status', 'TRANSFERRING')
  redis.call('HSETNX', key, 'time_transferring', iso)
  redis.call('HINCRBY', key, 'attempts', 1)
  local u = redis.call('HGET', key, 'target_user') or ''
  if not redis.call('HGET', key, 'active_user') then
    redis.call('HSET', key, 'active_user', u)
    redis.call('HINCRBY', P .. ':user_active', u, 1)
  end
  emit(P, id)
  return id
end
if limit <= 0 then
  while true do
    local id = redis.call('RPOP', q)
    if not id then return false end
    local key = P .. ':job:' .. id
    local st = redis.call('HGET', key, 'status')
    if st == 'SUBMITTED' or st == 'TRANSFERRING' then return take(id, key) end
  end
end
local i = -1
local scanned = 0
while scanned < max_scan do
  local id = redis.call('LINDEX', q, i)
  if not id then return false end
  scanned = scanned + 1
  local key = P .. ':job:' .. id
  local st = redis.call('HGET', key, 'status')
  if st ~= 'SUBMITTED' and st ~= 'TRANSFERRING' then
    -- a stale entry (cancelled, ended or gone): drop it; index i now holds the next one
    redis.call('LREM', q, -1, id)
  else
    local u = redis.call('HGET', key, 'target_user') or ''
    if tonumber(redis.call('HGET', P .. ':user_active', u) or '0') < limit then
      redis.call('LREM', q, -1, id)
      return take(id, key)
    end
    i = i - 1
  end
end
return false
"""

# ARGV: prefix, id, token, lease_ms, field, value, ... ; returns status, or false when the claim is lost
_HEARTBEAT = _NOW + _EVENTS + """
local P, id, token, lease = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = P .. ':job:' .. id
if redis.call('HGET', key, 'claim') ~= token then return false end
redis.call('ZADD', P .. ':active', 'XX', now + lease, id)
local st = redis.call('HGET', key, 'status')
-- progress only while copying: a cancelled job keeps what its cancel recorded
if st == 'TRANSFERRING' then
  local changed = false
  for i = 5, #ARGV, 2 do
    if redis.call('HGET', key, ARGV[i]) ~= ARGV[i + 1] then changed = true end
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  end
  -- a progress event at most once a second per job
  if changed and now - tonumber(redis.call('HGET', key, 'event_ms') or '0') >= 1000 then
    redis.call('HSET', key, 'event_ms', now)
    emit(P, id)
  end
end
return st
"""

# ARGV: prefix, id, token, field, value, ... ; 1 when the claim holds and the job may publish
_FENCE = """
local P, id, token = ARGV[1], ARGV[2], ARGV[3]
local key = P .. ':job:' .. id
if redis.call('HGET', key, 'claim') ~= token then return 0 end
if redis.call('HGET', key, 'status') ~= 'TRANSFERRING' then return 0 end
for i = 4, #ARGV, 2 do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
end
redis.call('HSET', key, 'publishing', token)
return 1
"""

# ARGV: prefix, id, token ; a new attempt found no folder published by a dead one: cancellable again
_UNFENCE = """
local key = ARGV[1] .. ':job:' .. ARGV[2]
if redis.call('HGET', key, 'claim') ~= ARGV[3] then return 0 end
redis.call('HDEL', key, 'publishing', 'publish_tmp', 'publish_dev', 'publish_ino')
return 1
"""

# The temporary folders a job's attempts made (engine.TempRecord words, space-separated, in the
# job's ``temp_dirs`` field), so that any later cleanup removes them by inode, never by name.
_TEMP_WORDS = """
local function temp_words(key, drop)
  local out = {}
  for w in string.gmatch(redis.call('HGET', key, 'temp_dirs') or '', '%S+') do
    if not drop[string.match(w, '^[^:]+')] then table.insert(out, w) end
  end
  return out
end
local function set_words(key, out)
  if #out == 0 then redis.call('HDEL', key, 'temp_dirs')
  else redis.call('HSET', key, 'temp_dirs', table.concat(out, ' ')) end
end
"""

# ARGV: prefix, id, token, record ; 1 when the claim holds (the record replaces its attempt's earlier one)
_ADD_TEMP = _TEMP_WORDS + """
local key = ARGV[1] .. ':job:' .. ARGV[2]
if redis.call('HGET', key, 'claim') ~= ARGV[3] then return 0 end
local out = temp_words(key, {[string.match(ARGV[4], '^[^:]+')] = true})
table.insert(out, ARGV[4])
set_words(key, out)
return 1
"""

# ARGV: prefix, id, attempt, ... ; forget these attempts' records (their folders are gone or not ours)
_DROP_TEMPS = _TEMP_WORDS + """
local key = ARGV[1] .. ':job:' .. ARGV[2]
if redis.call('EXISTS', key) == 0 then return 0 end
local drop = {}
for i = 3, #ARGV do drop[ARGV[i]] = true end
set_words(key, temp_words(key, drop))
return 1
"""

# ARGV: prefix, id, token, status, iso_now, field, value, ... ; returns the status the job ends in, or false
_FINISH = _NOW + _UNCOUNT + _FORGET + _EVENTS + """
local P, id, token, status, iso = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = P .. ':job:' .. id
if redis.call('HGET', key, 'claim') ~= token then return false end
redis.call('ZREM', P .. ':active', id)
redis.call('ZREM', P .. ':deadlines', id)
uncount(P, key)
redis.call('HDEL', key, 'claim', 'publishing')
local st = redis.call('HGET', key, 'status')
if st == 'SUCCESS' or st == 'ERROR' or st == 'CANCELLED' then
  forget_later(P, id, key)
  return st
end
redis.call('HSET', key, 'status', status, 'time_' .. string.lower(status), iso)
for i = 6, #ARGV, 2 do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
end
emit(P, id)
forget_later(P, id, key)
return status
"""

# ARGV: prefix, id, token, detail ; hand a claimed job back to the front of the queue.
# Returns 1 (handed back), 0 (the claim had moved on) or 2 (refused: the job passed its
# publish fence and may be published; its holder keeps it and records the result).
_RELEASE = _NOW + _UNCOUNT + _FORGET + _EVENTS + _REQUEUE + """
local P, id, token, detail = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = P .. ':job:' .. id
if redis.call('HGET', key, 'claim') ~= token then return 0 end
if redis.call('HEXISTS', key, 'publishing') == 1 then return 2 end
requeue(P, id, key, detail)
return 1
"""

# ARGV: prefix, detail[, id, token] ; requeue jobs whose lease lapsed (or one given job
# whose holder is known dead); returns {requeued..., '|', ended...}
_RECOVER = _NOW + _UNCOUNT + _FORGET + _EVENTS + _REQUEUE + """
local P, detail = ARGV[1], ARGV[2]
local ids
if ARGV[3] then
  if redis.call('HGET', P .. ':job:' .. ARGV[3], 'claim') ~= ARGV[4] then return {'|'} end
  ids = {ARGV[3]}
else
  ids = redis.call('ZRANGEBYSCORE', P .. ':active', '-inf', now)
end
local requeued, ended = {}, {}
for _, id in ipairs(ids) do
  if requeue(P, id, P .. ':job:' .. id, detail) then
    table.insert(requeued, id)
  else
    table.insert(ended, id)
  end
end
table.insert(requeued, '|')
for _, id in ipairs(ended) do table.insert(requeued, id) end
return requeued
"""

# ARGV: prefix, id, token, iso_now, reason, detail, field, value, ... ; the holder of a claim gives up
# on a running copy whose thread does not come back (stalled): the job ends in ERROR now. The
# claim and the lease stay until the thread returns (and the engine removes its temporary
# folder) or, if the process dies first, until recovery finds the ended job and removes it.
# Refused (0) once the job may publish, or when it is no longer this claim's running job.
_GIVE_UP = _UNCOUNT + _EVENTS + """
local P, id, token, iso, reason, detail = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local key = P .. ':job:' .. id
if redis.call('HGET', key, 'claim') ~= token then return 0 end
if redis.call('HEXISTS', key, 'publishing') == 1 then return 0 end
if redis.call('HGET', key, 'status') ~= 'TRANSFERRING' then return 0 end
for i = 7, #ARGV, 2 do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
end
redis.call('HSET', key, 'status', 'ERROR', 'time_error', iso, 'reason', reason, 'detailed_status', detail)
redis.call('ZREM', P .. ':deadlines', id)
uncount(P, key)
emit(P, id)
return 1
"""

# ARGV: prefix, iso_now ; jobs past their timeout_seconds end in ERROR 'timeout' (at most 100 a
# call). A claimed job keeps its claim, as with a cancel: its worker sees the ended status at its
# next heartbeat and stops; a job that may already be publishing is left to finish.
_SWEEP_DEADLINES = _NOW + _UNCOUNT + _FORGET + _EVENTS + """
local P, iso = ARGV[1], ARGV[2]
local ids = redis.call('ZRANGEBYSCORE', P .. ':deadlines', '-inf', now, 'LIMIT', 0, 100)
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', P .. ':deadlines', id)
  local key = P .. ':job:' .. id
  local st = redis.call('HGET', key, 'status')
  if (st == 'SUBMITTED' or st == 'STAGING' or st == 'TRANSFERRING')
      and redis.call('HEXISTS', key, 'publishing') == 0 then
    redis.call('HSET', key, 'status', 'ERROR', 'time_error', iso, 'reason', 'timeout', 'detailed_status',
               'not finished within its timeout of ' .. (redis.call('HGET', key, 'timeout_seconds') or '?') .. ' seconds')
    redis.call('HDEL', key, 'authcode_hash')
    redis.call('LREM', P .. ':queue', 0, id)
    redis.call('ZREM', P .. ':staging', id)
    if redis.call('HEXISTS', key, 'claim') == 0 then redis.call('ZREM', P .. ':active', id) end
    uncount(P, key)
    emit(P, id)
    forget_later(P, id, key)
    table.insert(out, id)
  end
end
return out
"""

# ARGV: prefix, id, iso_now, detail ; returns OK | NOTFOUND | PUBLISHING | <final status>
_CANCEL = _NOW + _FORGET + _EVENTS + """
local P, id, iso, detail = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = P .. ':job:' .. id
local st = redis.call('HGET', key, 'status')
if not st then return 'NOTFOUND' end
if st == 'SUCCESS' or st == 'ERROR' or st == 'CANCELLED' then return st end
if redis.call('HEXISTS', key, 'publishing') == 1 then return 'PUBLISHING' end
redis.call('HSET', key, 'status', 'CANCELLED', 'time_cancelled', iso, 'reason', 'cancelled',
           'detailed_status', detail)
redis.call('HDEL', key, 'authcode_hash')
redis.call('LREM', P .. ':queue', 0, id)
redis.call('ZREM', P .. ':staging', id)
if redis.call('HEXISTS', key, 'claim') == 0 then redis.call('ZREM', P .. ':active', id) end
emit(P, id)
forget_later(P, id, key)
return 'OK'
"""

# KEYS: folder key or '' ; ARGV: prefix, id, code_hash, success(0/1), iso_now, field, value, ...
# A staged job takes the folder key (unless a live job already owns it), so a later
# /complete_transfer for the same user and folder is a repeat of it.
_STAGED = _NOW + _FORGET + _EVENTS + """
local P, id, code, success, iso = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = P .. ':job:' .. id
local st = redis.call('HGET', key, 'status')
if not st then return 'NOTFOUND' end
if st ~= 'STAGING' then return 'NOTSTAGING' end
local h = redis.call('HGET', key, 'authcode_hash')
if (not h) or h ~= code then return 'BADCODE' end
redis.call('HDEL', key, 'authcode_hash')
redis.call('ZREM', P .. ':staging', id)
for i = 6, #ARGV, 2 do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
end
if success == '1' then
  redis.call('HSET', key, 'status', 'SUBMITTED', 'time_staged', iso)
  redis.call('HSETNX', key, 'time_submitted', iso)
  redis.call('LPUSH', P .. ':queue', id)
  if KEYS[1] ~= '' then
    local owner = redis.call('GET', KEYS[1])
    local ost = owner and redis.call('HGET', P .. ':job:' .. owner, 'status')
    if (not ost) or ost == 'ERROR' or ost == 'CANCELLED' then
      redis.call('SET', KEYS[1], id)
      redis.call('HSET', key, 'folder_key', KEYS[1])
    end
  end
else
  redis.call('HSET', key, 'status', 'ERROR', 'time_error', iso, 'reason', 'staging_failed')
end
emit(P, id)
if success ~= '1' then forget_later(P, id, key) end
return 'OK'
"""

# ARGV: prefix, iso_now ; jobs whose staging deadline passed end in ERROR
_SWEEP_STAGING = _NOW + _FORGET + _EVENTS + """
local P, iso = ARGV[1], ARGV[2]
local ids = redis.call('ZRANGEBYSCORE', P .. ':staging', '-inf', now)
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', P .. ':staging', id)
  local key = P .. ':job:' .. id
  if redis.call('HGET', key, 'status') == 'STAGING' then
    redis.call('HSET', key, 'status', 'ERROR', 'time_error', iso, 'reason', 'staging_timeout',
               'detailed_status', 'the stager did not report within ' .. (redis.call('HGET', key, 'staging_timeout') or '?') .. ' seconds')
    redis.call('HDEL', key, 'authcode_hash')
    emit(P, id)
    forget_later(P, id, key)
    table.insert(out, id)
  end
end
return out
"""

# The watcher's mark outlives the folder's job: a job is forgotten after the retention,
# but the folder may stay in the DTS area for ever, and a watcher that found no mark
# would deliver it again (a restart has no memory). So the mark gets its own TTL,
# ``mark_ms`` (at least the retention, at least WATCH_MARK_MS), which the watcher renews
# while it sees the folder (_WATCHED_KEEP), and cuts to the retention when the folder
# has left the DTS area (_WATCHED_GONE): marks are bounded by the folders present plus
# those removed within the retention (or WATCH_MARK_MS, for removals no watcher saw).
# KEYS: the mark ; ARGV: prefix, job id, mark_ms
_WATCHED_DONE = """
redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
return 1
"""

# KEYS: the mark ; ARGV: prefix, mark_ms ; the folder is still there: keep its mark (or put back
# one lost with Redis's data: this process knows the folder is done). A taker's mark
# (``taking:…``) keeps its own short expiry.
_WATCHED_KEEP = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'done', 'PX', tonumber(ARGV[2]))
elseif string.sub(v, 1, 7) ~= 'taking:' then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 1
"""

# KEYS: the mark ; ARGV: prefix, retain_ms ; the folder has left the DTS area: its mark is
# forgotten after the retention (a folder back within it is still not taken again).
_WATCHED_GONE = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 7) == 'taking:' then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 or ttl > tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
return 1
"""

# ARGV: prefix, max_due, walk, retain_ms ; returns {index entries dropped, jobs scheduled}.
# (1) Jobs whose retention is up leave the index (``P:jobs``) and ``P:expiring``.
# (2) A cursor walks ``walk`` entries of ``P:jobs`` per call: an entry whose job is
#     gone (deleted by hand, or lost) is dropped, and an ended job that has no expiry
#     (made before retention existed) is scheduled with ``retain_ms``, so every job is
#     forgotten in time.
_TRIM = _NOW + _FORGET + """
local P, max_due, walk, retain = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local jobs, exp = P .. ':jobs', P .. ':expiring'
local dropped, scheduled = 0, 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, max_due)) do
  local ttl = redis.call('PTTL', P .. ':job:' .. id)
  if ttl == -2 then
    redis.call('ZREM', jobs, id)
    redis.call('ZREM', exp, id)
    dropped = dropped + 1
  elseif ttl == -1 then
    redis.call('ZREM', exp, id)
  else
    redis.call('ZADD', exp, now + ttl, id)
  end
end
local cur = tonumber(redis.call('GET', P .. ':trim_cursor') or '0') or 0
local was = cur
local batch = redis.call('ZRANGE', jobs, cur, cur + walk - 1)
local kept = 0
for _, id in ipairs(batch) do
  local key = P .. ':job:' .. id
  local ttl = redis.call('PTTL', key)
  if ttl == -2 then
    redis.call('ZREM', jobs, id)
    redis.call('ZREM', exp, id)
    dropped = dropped + 1
  else
    kept = kept + 1
    if ttl == -1 and redis.call('HEXISTS', key, 'claim') == 0 then
      local st = redis.call('HGET', key, 'status')
      if st == 'SUCCESS' or st == 'ERROR' or st == 'CANCELLED' then
        forget_later(P, id, key, retain)
        scheduled = scheduled + 1
      end
    end
  end
end
if #batch < walk then cur = 0 else cur = cur + kept end
if cur ~= was then redis.call('SET', P .. ':trim_cursor', cur) end  -- an idle trim writes nothing
return {dropped, scheduled}
"""


# ARGV: prefix, user or '', status or '', limit, scan ; returns {id, {field, value, ...}, ...} newest first
_LIST = """
local P, user, status, limit, scan = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local out, found, start = {}, 0, 0
while found < limit and start < scan do
  local ids = redis.call('ZREVRANGE', P .. ':jobs', start, start + 199)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local key = P .. ':job:' .. id
    local ok = true
    if user ~= '' and redis.call('HGET', key, 'target_user') ~= user then ok = false end
    if ok and status ~= '' and redis.call('HGET', key, 'status') ~= status then ok = false end
    if ok then
      local h = redis.call('HGETALL', key)
      if #h > 0 then
        table.insert(out, id)
        table.insert(out, h)
        found = found + 1
        if found >= limit then break end
      end
    end
  end
  start = start + 200
end
return out
"""


#: Redis error codes that mean "up, but refusing for now" (loading, failing over, out of
#: memory under noeviction, short of replicas): the caller gets a 503 and may retry.
_REFUSED_FOR_NOW = re.compile(r"(?:^|: -)(LOADING|BUSY|MASTERDOWN|READONLY|TRYAGAIN|OOM|NOREPLICAS)\b")


def refused_for_now(message: str) -> bool:
    """Whether a Redis error is a passing refusal, as a reply (``OOM command not allowed…``)
    or wrapped by a script (``ERR Error running script …: @user_script:25: -OOM …``)."""
    return _REFUSED_FOR_NOW.search(message) is not None


def _flat(fields: dict[str, Any] | Iterable[tuple[str, Any]]) -> list[str]:
    items = fields.items() if isinstance(fields, dict) else fields
    out: list[str] = []
    for k, v in items:
        if v is None:
            continue
        if isinstance(v, bool):
            v = "1" if v else "0"
        out += [k, str(v)]
    return out


# ARGV: prefix, group, event_id, body, url... ; one delivery per URL, then the event is acknowledged
_HOOK_ADD = _NOW + """
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
_HOOK_TAKE = _NOW + """
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

# ARGV: prefix, member, token ; delivered: forget it (only its taker may)
_HOOK_DONE = """
local P, member, token = ARGV[1], ARGV[2], ARGV[3]
local key = P .. ':hook:' .. member
if redis.call('HGET', key, 'taker') ~= token then return 0 end
redis.call('DEL', key)
redis.call('ZREM', P .. ':hooks', member)
return 1
"""

# ARGV: prefix, member, token, delay_ms (-1: give up), error ; a failed attempt
_HOOK_RETRY = _NOW + """
local P, member, token, delay, err = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local key = P .. ':hook:' .. member
if redis.call('HGET', key, 'taker') ~= token then return 0 end
if delay < 0 then
  redis.call('DEL', key)
  redis.call('ZREM', P .. ':hooks', member)
  return 1
end
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('HSET', key, 'last_error', err)
redis.call('HDEL', key, 'taker')
redis.call('ZADD', P .. ':hooks', 'XX', now + delay, member)
return 1
"""


def parse_events(entries) -> list[tuple[str, Job]]:
    """``XRANGE``/``XREAD`` entries (``[id, [field, value, …]]``) as (event id, job as it was then)."""
    out: list[tuple[str, Job]] = []
    for entry_id, flat in entries or []:
        h = dict(zip(flat[::2], flat[1::2]))
        job_id = h.pop("job_id", None)
        if job_id and "status" in h:
            try:
                out.append((entry_id, Job.from_hash(job_id, h)))
            except ValueError:  # an unknown status: skip the entry rather than stop the stream
                continue
    return out


def connect(url: str, poolsize: int = 10, reactor=None):
    """A lazy, self-reconnecting txredisapi connection pool for ``url``.

    ``redis://[:password@]host:port[/db]``, ``unix:///path/redis.sock[?db=N]``, or
    ``redis+sentinel://host:port[,host:port…]/master_name[/db]`` (Sentinel).
    Database 0 is never SELECTed, so a reconnect cannot fail on SELECT.
    """
    u = urllib.parse.urlsplit(url)
    kw: dict[str, Any] = dict(poolsize=poolsize, reconnect=True, convertNumbers=False, connectTimeout=5)
    if u.password:
        kw["password"] = urllib.parse.unquote(u.password)
    if u.scheme == "unix":
        q = urllib.parse.parse_qs(u.query)
        db = int(q.get("db", ["0"])[0])
        return txredisapi.lazyUnixConnectionPool(u.path, dbid=db or None, **kw)
    if u.scheme == "redis+sentinel":
        hosts = []
        for hp in u.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = hp.rpartition(":")
            hosts.append((host or hp, int(port or 26379)))
        parts = [p for p in u.path.split("/") if p]
        if not parts:
            raise ValueError("redis+sentinel:// URL needs a master name: redis+sentinel://host:26379/mymaster")
        db = int(parts[1]) if len(parts) > 1 else 0
        sentinel = txredisapi.Sentinel(hosts)
        return sentinel.master_for(parts[0], dbid=db or None, poolsize=poolsize,
                                   **{k: v for k, v in kw.items() if k in ("password",)})
    if u.scheme == "redis":
        db = int(u.path.strip("/") or 0)
        return txredisapi.lazyConnectionPool(u.hostname or "127.0.0.1", u.port or 6379, dbid=db or None, **kw)
    raise ValueError(f"unsupported Redis URL {url!r}")


class Store:
    """Async access to jobs, queue and leases; every call answers or fails within ``timeout``."""

    log = Logger()

    def __init__(self, redis, prefix: str = "dtsbridge", timeout: float = 5.0, reactor=None,
                 retention_s: float = DEFAULT_RETAIN_MS / 1000) -> None:
        if reactor is None:
            from twisted.internet import reactor  # noqa: F811
        self._redis = redis
        self.prefix = prefix
        self.timeout = timeout
        #: ``[state] retention_days`` in ms: recorded on each job made here (``retain_ms``)
        self.retain_ms = max(1, int(retention_s * 1000))
        #: how long a watcher's mark lives unrenewed (see :data:`_WATCHED_DONE`)
        self.mark_ms = max(self.retain_ms, WATCH_MARK_MS)
        self.reactor = reactor
        self.errors = 0  # Redis errors and timeouts seen (for /metrics)

    # -- plumbing ---------------------------------------------------------

    @property
    def redis(self):
        """The connection pool; until :meth:`attach` (embedded Redis still starting) every call is a 503."""
        if self._redis is None:
            raise StoreUnavailable("Redis is starting")
        return self._redis

    def attach(self, redis) -> None:
        """Use this connection pool from now on (for a Redis that was not up when the store was made)."""
        self._redis = redis

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def folder_key(self, user: str, source_rel: str) -> str:
        return self._key("folder", user, source_rel)

    async def _call(self, d: Deferred) -> Any:
        d.addTimeout(self.timeout, self.reactor)
        try:
            return await d
        except (defer.TimeoutError, defer.CancelledError, txredisapi.ConnectionError) as e:
            self.errors += 1
            raise StoreUnavailable(f"Redis did not answer: {e.__class__.__name__}") from None
        except txredisapi.ResponseError as e:
            self.errors += 1
            msg = str(e)
            # Redis up but refusing for now (loading, failing over, out of memory under
            # noeviction, short of replicas): a 503, and retried by whoever must not give up.
            if refused_for_now(msg):
                raise StoreUnavailable(f"Redis is not ready: {msg}") from None
            raise
        except ConnectionError as e:  # builtin, e.g. refused while connecting
            self.errors += 1
            raise StoreUnavailable(f"Redis is unreachable: {e}") from None

    async def _eval(self, script: str, keys: list[str], args: list[str]) -> Any:
        return await self._call(self.redis.eval(script, keys, [self.prefix, *args]))

    async def _eval_replicated(self, script: str, keys: list[str], args: list[str], required: bool = True) -> Any:
        """Run a script, then, when the primary has replicas, wait until one of them has it (``WAIT 1``).

        ``WAIT`` only covers the writes of the connection it runs on, so the script,
        ``ROLE`` and ``WAIT`` go over one connection taken from the pool for the
        duration. What this guards (a job's creation, its publish fence) then
        survives a Sentinel failover. ``required``: no replica's acknowledgement in
        time is a :class:`StoreUnavailable` (the write stands on the primary; a
        repeat of the request finds it); otherwise it is only logged.
        """
        redis = self.redis
        factory = getattr(redis, "_factory", None)
        if factory is None or not hasattr(factory, "connectionQueue"):  # not a txredisapi pool
            return await self._eval(script, keys, args)
        conn = await self._call(factory.getConnection())
        try:
            r = await self._call(conn.eval(script, keys, [self.prefix, *args]))
            role = await self._call(conn.role())
            if role and role[0] == "master" and len(role) > 2 and role[2]:
                wait_ms = max(100, int(self.timeout * 800))
                acked = await self._call(conn.execute_command("WAIT", 1, wait_ms))
                if int(acked or 0) < 1:
                    self.errors += 1
                    if required:
                        raise StoreUnavailable(f"no replica confirmed the write within {wait_ms} ms")
                    self.log.warn("no Redis replica confirmed a write within {ms} ms", ms=wait_ms)
            return r
        finally:
            factory.connectionQueue.put(conn)

    # -- reading ----------------------------------------------------------

    async def ping(self) -> bool:
        return (await self._call(self.redis.ping())) in ("PONG", b"PONG", True)

    async def get_job(self, job_id: str) -> Job | None:
        h = await self._call(self.redis.hgetall(self._key("job", job_id)))
        if not h or "status" not in h:
            return None
        return Job.from_hash(job_id, h)

    async def folder_job(self, folder_key: str) -> str | None:
        """The id of the job that owns a folder key, if any."""
        return await self._call(self.redis.get(folder_key))

    async def get_field(self, job_id: str, field: str) -> str | None:
        return await self._call(self.redis.hget(self._key("job", job_id), field))

    async def counts(self) -> dict[str, int]:
        queued = await self._call(self.redis.llen(self._key("queue")))
        active = await self._call(self.redis.zcard(self._key("active")))
        staging = await self._call(self.redis.zcard(self._key("staging")))
        return {"queued": int(queued or 0), "active": int(active or 0), "staging": int(staging or 0)}

    async def active_holders(self) -> list[tuple[str, str, str]]:
        """(job_id, claim token, holder) of every claimed job."""
        ids = await self._call(self.redis.zrange(self._key("active"), 0, -1))
        out = []
        for job_id in ids or []:
            claim = await self.get_field(job_id, "claim")
            holder = await self.get_field(job_id, "lease_host")
            if claim:
                out.append((job_id, claim, holder or ""))
        return out

    async def list_jobs(self, user: str | None = None, status: str | None = None, limit: int = 100,
                        scan: int = 20_000) -> list[Job]:
        """The newest jobs (at most ``limit``) matching ``user`` and ``status``, in one round trip.

        At most ``scan`` of the newest jobs are looked at, so a listing stays
        bounded however long the history is.
        """
        r = await self._eval(_LIST, [], [user or "", status or "", str(limit), str(scan)])
        out: list[Job] = []
        for i in range(0, len(r or []), 2):
            h = dict(zip(r[i + 1][::2], r[i + 1][1::2]))
            if "status" in h:
                out.append(Job.from_hash(r[i], h))
        return out

    # -- events -----------------------------------------------------------

    @property
    def events_key(self) -> str:
        return self._key("events")

    async def last_event_id(self) -> str:
        """The id of the newest event, or ``0-0`` when there is none."""
        r = await self._call(self.redis.execute_command("XREVRANGE", self.events_key, "+", "-", "COUNT", "1"))
        return r[0][0] if r else "0-0"

    async def events_after(self, after: str, count: int = 500) -> list[tuple[str, Job]]:
        """At most ``count`` events that came after the event ``after``, oldest first."""
        return parse_events(await self.event_entries(after, count))

    async def event_entries(self, after: str, count: int = 500) -> list:
        """The same as raw ``XRANGE`` entries (``[id, [field, value, …]]``), for callers that parse lazily."""
        r = await self._call(self.redis.execute_command("XRANGE", self.events_key, "(" + after, "+",
                                                        "COUNT", str(count)))
        return list(r or [])

    # -- changing ---------------------------------------------------------

    async def create_job(self, job_id: str, fields: dict[str, Any], folder_key: str | None = None,
                         enqueue: bool = True, staging_s: float | None = None) -> tuple[bool, str]:
        """Create a job; with ``folder_key``, join the live job for that folder instead.

        Returns ``(created, job_id)``: ``created`` is false when an existing job
        (queued, staging, running or successful) already owns the folder. With
        ``staging_s`` the job (not queued) gets its staging deadline in the same
        atomic step. A job created already ended (a refused watched folder) is
        scheduled to be forgotten like any other.
        """
        mode = f"staging:{max(1, int(staging_s * 1000))}" if staging_s is not None else ("1" if enqueue else "0")
        r = await self._eval_replicated(_CREATE, [folder_key or ""],
                                        [job_id, mode, *_flat(fields), "retain_ms", str(self.retain_ms)])
        return bool(int(r[0])), r[1]

    async def claim(self, token: str, holder: str, lease_s: float, iso_now: str,
                    per_user_limit: int | None = None) -> str | None:
        """Claim the oldest queued job whose target user runs fewer than ``per_user_limit`` jobs."""
        r = await self._eval(_CLAIM, [], [token, holder, str(int(lease_s * 1000)), iso_now,
                                          str(per_user_limit or 0), "1000"])
        return r or None

    async def heartbeat(self, job_id: str, token: str, lease_s: float, fields: dict[str, Any]) -> str | None:
        """Renew the lease and record progress; the job's status, or None if the claim was lost."""
        r = await self._eval(_HEARTBEAT, [], [job_id, token, str(int(lease_s * 1000)), *_flat(fields)])
        return r or None

    async def fence(self, job_id: str, token: str, fields: dict[str, Any]) -> bool:
        return bool(await self._eval_replicated(_FENCE, [], [job_id, token, *_flat(fields)]))

    async def unfence(self, job_id: str, token: str) -> bool:
        """Forget a dead attempt's publish record once it is known not to have published."""
        return bool(await self._eval(_UNFENCE, [], [job_id, token]))

    async def add_temp(self, job_id: str, token: str, record: str) -> bool:
        """Record a temporary folder of the attempt holding ``token`` (an ``engine.TempRecord`` word)."""
        return bool(await self._eval(_ADD_TEMP, [], [job_id, token, record]))

    async def drop_temps(self, job_id: str, attempts: list[str]) -> None:
        """Forget the temporary folder records of these attempts."""
        if attempts:
            await self._eval(_DROP_TEMPS, [], [job_id, *attempts])

    async def finish(self, job_id: str, token: str, status: str, iso_now: str, fields: dict[str, Any]) -> str | None:
        """Record the final state if the claim still holds; the status the job ended in, or None."""
        r = await self._eval_replicated(_FINISH, [], [job_id, token, status, iso_now, *_flat(fields)],
                                        required=False)
        return r or None

    async def release(self, job_id: str, token: str, detail: str) -> str:
        """Hand a claimed job back to the queue: ``released``, ``lost`` (the claim had moved
        on) or ``publishing`` (refused: past its publish fence, the holder must finish it)."""
        r = int(await self._eval(_RELEASE, [], [job_id, token, detail]))
        return {1: "released", 0: "lost", 2: "publishing"}[r]

    async def recover(self, detail: str, job_id: str | None = None, token: str | None = None) -> tuple[list[str], list[str]]:
        """Requeue lapsed leases (or one job whose holder is dead): (requeued, already ended)."""
        args = [detail] + ([job_id, token] if job_id else [])
        r = await self._eval(_RECOVER, [], args)
        i = r.index("|")
        return list(r[:i]), list(r[i + 1:])

    async def give_up(self, job_id: str, token: str, iso_now: str, reason: str, detail: str,
                      fields: dict[str, Any] | None = None) -> bool:
        """End this claim's running job in ERROR now, without waiting for its copy (see ``_GIVE_UP``)."""
        return bool(await self._eval(_GIVE_UP, [], [job_id, token, iso_now, reason, detail, *_flat(fields or {})]))

    async def sweep_deadlines(self, iso_now: str) -> list[str]:
        """End the jobs whose ``timeout_seconds`` ran out (ERROR ``timeout``); their ids."""
        return list(await self._eval(_SWEEP_DEADLINES, [], [iso_now]) or [])

    async def cancel(self, job_id: str, iso_now: str, detail: str) -> str:
        return await self._eval(_CANCEL, [], [job_id, iso_now, detail])

    async def staged(self, job_id: str, code_hash: str, success: bool, iso_now: str, fields: dict[str, Any],
                     folder_key: str | None = None) -> str:
        return await self._eval_replicated(_STAGED, [folder_key or ""],
                                        [job_id, code_hash, "1" if success else "0", iso_now, *_flat(fields)])

    async def sweep_staging(self, iso_now: str) -> list[str]:
        return list(await self._eval(_SWEEP_STAGING, [], [iso_now]) or [])

    async def mark_watched(self, source_rel: str, holder: str, ttl_s: int = 300) -> bool:
        """Take a folder for the watcher; True only for the first process to ask.

        The mark expires after ``ttl_s`` unless :meth:`watched_done` makes it
        permanent, so a process that dies between taking a folder and queueing
        its job does not lose the folder for good.
        """
        r = await self._call(self.redis.set(self._key("watched", source_rel), f"taking:{holder}",
                                            expire=ttl_s, only_if_not_exists=True))
        return r not in (None, False)

    async def watched_done(self, source_rel: str, job_id: str) -> None:
        """The folder's job exists: the mark names it for ``mark_ms``, however soon the job is forgotten."""
        await self._eval(_WATCHED_DONE, [self._key("watched", source_rel)], [job_id, str(self.mark_ms)])

    async def keep_watched(self, source_rel: str) -> None:
        """The done folder is still in the DTS area: its mark lives ``mark_ms`` from now."""
        await self._eval(_WATCHED_KEEP, [self._key("watched", source_rel)], [str(self.mark_ms)])

    async def watched_gone(self, source_rel: str) -> None:
        """The done folder has left the DTS area: its mark is forgotten after the retention."""
        await self._eval(_WATCHED_GONE, [self._key("watched", source_rel)], [str(self.retain_ms)])

    async def trim(self, max_due: int = 1000, walk: int = 200) -> tuple[int, int]:
        """Drop index entries of forgotten jobs (see :data:`_TRIM`): (dropped, newly scheduled)."""
        r = await self._eval(_TRIM, [], [str(max_due), str(walk), str(self.retain_ms)])
        return int(r[0]), int(r[1])

    async def unmark_watched(self, source_rel: str) -> None:
        """Give a folder back to the watchers (its job could not be created)."""
        await self._call(self.redis.delete(self._key("watched", source_rel)))

    async def watched(self, source_rel: str) -> str | None:
        """The folder's watcher mark: a job id, ``taking:<holder>`` while a job is being made, or None."""
        return await self._call(self.redis.get(self._key("watched", source_rel)))

    # -- webhook deliveries ---------------------------------------------------

    async def hooks_group(self, group: str, start_id: str = "$") -> None:
        """Make the consumer group that turns events after ``start_id`` into deliveries (once; later calls keep it)."""
        try:
            await self._call(self.redis.execute_command("XGROUP", "CREATE", self.events_key, group, start_id,
                                                        "MKSTREAM"))
        except (txredisapi.ResponseError, StoreUnavailable) as e:
            if "BUSYGROUP" not in str(e):  # (_call takes BUSYGROUP for Redis's BUSY)
                raise

    async def hooks_read(self, group: str, consumer: str, count: int = 100,
                         stale_ms: int | None = None) -> list[tuple[str, Job | None]]:
        """New events for the group (or, with ``stale_ms``, those a consumer took and never acknowledged)."""
        if stale_ms is not None:
            r = await self._call(self.redis.execute_command("XAUTOCLAIM", self.events_key, group, consumer,
                                                            str(stale_ms), "0-0", "COUNT", str(count)))
            entries = r[1] if r else []
        else:
            r = await self._call(self.redis.execute_command("XREADGROUP", "GROUP", group, consumer,
                                                            "COUNT", str(count), "STREAMS", self.events_key, ">"))
            if not r:
                return []
            entries = r[0][1] if isinstance(r, list) else next(iter(r.values()))
        out: list[tuple[str, Job | None]] = []
        parsed = dict(parse_events([e for e in entries or [] if e and e[1]]))
        for entry in entries or []:
            if entry:
                out.append((entry[0], parsed.get(entry[0])))
        return out

    async def hooks_add(self, group: str, event_id: str, body: str, urls: list[str]) -> None:
        """Queue one delivery of ``body`` per URL and acknowledge the event, in one step."""
        await self._eval(_HOOK_ADD, [], [group, event_id, body, *urls])

    async def hooks_take(self, token: str, lease_ms: int, count: int) -> list[tuple[str, str, str, int, int]]:
        """Due deliveries, each leased to ``token``: (member, url, body, attempts, first try ms)."""
        r = await self._eval(_HOOK_TAKE, [], [token, str(lease_ms), str(count)])
        return [(r[i], r[i + 1], r[i + 2], int(r[i + 3]), int(r[i + 4])) for i in range(0, len(r or []), 5)]

    async def hooks_done(self, member: str, token: str) -> bool:
        return bool(await self._eval(_HOOK_DONE, [], [member, token]))

    async def hooks_retry(self, member: str, token: str, delay_ms: int, error: str) -> bool:
        return bool(await self._eval(_HOOK_RETRY, [], [member, token, str(delay_ms), error[:500]]))

    async def hooks_pending(self) -> int:
        return int(await self._call(self.redis.zcard(self._key("hooks"))) or 0)

    async def close(self) -> None:
        if self._redis is None:
            return
        try:
            await self._redis.disconnect()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass
