"""The store's Lua scripts: one script per atomic operation, read top to bottom.

Every change to Redis that must be atomic is one script here; :mod:`dtsbridge.store`
runs them and turns their replies into enums, results and exceptions, so nothing
outside these two modules reads a reply string or builds a key. Each script is
its shared snippets followed by its own body; every script gets ``ARGV[1]`` = the
key prefix ``P`` (see the layout in :mod:`dtsbridge.store`).

Statuses, the "ended" test and the reasons the scripts record come from
:mod:`dtsbridge.model` and :mod:`dtsbridge.errors` through :data:`_CONSTANTS`:
no script spells a status or a reason itself (``tests/test_store_scripts.py``
checks this).

Every script reads the time from Redis (``TIME``) so hosts with skewed clocks
agree on leases and deadlines.
"""

from __future__ import annotations

from dtsbridge import errors
from dtsbridge.model import CLAIMABLE, FINAL, FOLDER_FREED, PUBLIC_FIELDS, Status

DEFAULT_RETAIN_MS = 30 * 86400 * 1000
#: the least time a watcher's mark of a done folder lives without renewal (see :data:`WATCHED_DONE`)
WATCH_MARK_MS = 30 * 86400 * 1000
#: at least 24 hours of events are kept in ``P:events``
EVENT_KEEP_MS = 25 * 3600 * 1000


def _lua_set(name: str, members: frozenset[Status]) -> str:
    entries = ", ".join(f"[{s.name}] = true" for s in sorted(members, key=list(Status).index))
    return f"local {name} = {{{entries}}}\n"


# The statuses (a Lua local per status, named like its model.Status member), the status
# sets the scripts test, and the reasons they record.
_CONSTANTS = (
    "".join(f"local {s.name} = '{s.value}'\n" for s in Status)
    + _lua_set("ENDED", FINAL)
    + _lua_set("FOLDER_FREED", FOLDER_FREED)
    + _lua_set("CLAIMABLE", CLAIMABLE)
    + "".join(f"local R_{r.upper()} = '{r}'\n"
              for r in (errors.CANCELLED, errors.TIMEOUT, errors.STAGING_FAILED, errors.STAGING_TIMEOUT))
    # what a job past its timeout_seconds says (the deadline sweep's and the publish fence's)
    + "local TIMEOUT_DETAIL = 'not finished within its timeout of '\n"
)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# The header of a script about one job: ARGV[2] is its id.
_JOB = """
local P, id = ARGV[1], ARGV[2]
local key = P .. ':job:' .. id
"""

# A worker holds a job through a claim token stored on the job: heartbeats, the publish
# fence and the final state are refused once the claim has moved on, so a stale worker
# can never publish twice or overwrite a newer state.
_HELD = """
local function held(key, token) return redis.call('HGET', key, 'claim') == token end
"""

# Job events. Every script that changes a job calls emit(P, id) in the same script, so
# the stream ``P:events`` can never miss or invent a change: one entry per change, holding
# ``job_id`` and the job's public fields (model.PUBLIC_FIELDS). The stream is trimmed by
# age (``MINID``; stream ids are milliseconds), never by count.
_EVENTS = """
local EVENT_FIELDS = {%s}
local function emit(P, id)
  local h = redis.call('HGETALL', P .. ':job:' .. id)
  if #h == 0 then return end
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local args = {'XADD', P .. ':events', 'MINID', '~', tostring(ms - %d), '*', 'job_id', id}
  for i = 1, #h, 2 do
    if EVENT_FIELDS[h[i]] then
      args[#args + 1] = h[i]
      args[#args + 1] = h[i + 1]
    end
  end
  redis.call(unpack(args))
end
""" % (", ".join(f"[{f!r}] = true" for f in PUBLIC_FIELDS if f != "job_id"), EVENT_KEEP_MS)

# Retention (needs _NOW): a job that has ended and that no worker holds any more is
# forgotten ``retain_ms`` (a field set at creation) from now, together with the keys
# that still name it. A job that ended while a worker still holds its claim (a
# cancelled copy) is scheduled when that claim is dropped (finish, release, recover).
_FORGET = """
local function forget_later(P, id, key, default_ms)
  if not ENDED[redis.call('HGET', key, 'status')] then return end
  if redis.call('HEXISTS', key, 'claim') == 1 then return end
  local ms = tonumber(redis.call('HGET', key, 'retain_ms') or '') or default_ms or %d
  if ms < 1 then ms = 1 end
  redis.call('PEXPIRE', key, ms)
  local k = redis.call('HGET', key, 'folder_key')
  if k and redis.call('GET', k) == id then redis.call('PEXPIRE', k, ms) end
  redis.call('ZADD', P .. ':expiring', now + ms, id)
end
""" % DEFAULT_RETAIN_MS

# Set field/value pairs from ARGV[first], ARGV[first + 1], ...
_FIELDS = """
local function set_fields(key, first)
  for i = first, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
end
"""

# Per-user running jobs: ``P:user_active`` maps a target user to the number of
# their jobs that hold a claim. A claim counts its job once (the job's
# ``active_user`` field says it is counted); every script that drops a claim
# (finish, release, recover, give up, deadline) uncounts it through uncount().
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

# Shared by release and recovery: drop a job's claim; a job still queued or copying goes
# back to the queue. Its publish record (``publishing``, ``publish_*``) stays: the attempt
# that held it may have published, so a cancel is still refused and the next attempt looks
# for that folder before copying. Returns true when the job was requeued; an ended job is
# scheduled to be forgotten instead.
_REQUEUE = _UNCOUNT + """
local function requeue(P, id, key, detail)
  redis.call('ZREM', P .. ':active', id)
  redis.call('HDEL', key, 'claim')
  uncount(P, key)
  if CLAIMABLE[redis.call('HGET', key, 'status')] then
    redis.call('HSET', key, 'status', SUBMITTED, 'detailed_status', detail)
    redis.call('RPUSH', P .. ':queue', id)
    emit(P, id)
    return true
  end
  redis.call('HDEL', key, 'publishing')
  forget_later(P, id, key)
  return false
end
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

_JOB_CHANGE = _CONSTANTS + _NOW + _FORGET + _EVENTS + _FIELDS  # what most job scripts start with

# A job ends in ERROR now. A claimed one keeps its claim, as with a cancel: its worker sees
# the ended status at its next heartbeat and stops (and the job is forgotten once it lets go).
_FAIL = _JOB_CHANGE + """
local function fail(P, id, key, iso, reason, detail)
  redis.call('HSET', key, 'status', ERROR, 'time_error', iso, 'reason', reason, 'detailed_status', detail)
  redis.call('HDEL', key, 'authcode_hash')
  emit(P, id)
  forget_later(P, id, key)
end
"""

# The housekeeping sweeps (needs _FAIL, P): every job whose time in ``zset`` has come (at most
# ``limit``, -1: all) and that ``ends(id, key)`` lets end fails with ``reason`` and ``detail ..
# <its field> .. ' seconds'``; returns their ids.
_SWEEP = """
local function sweep(zset, limit, iso, reason, detail, field, ends)
  local out = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', zset, '-inf', now, 'LIMIT', 0, limit)) do
    redis.call('ZREM', zset, id)
    local key = P .. ':job:' .. id
    if ends(id, key) then
      fail(P, id, key, iso, reason, detail .. (redis.call('HGET', key, field) or '?') .. ' seconds')
      table.insert(out, id)
    end
  end
  return out
end
"""


# -- creating jobs ------------------------------------------------------------

# KEYS: folder key or '' ; ARGV: prefix, job_id, enqueue, field1, value1, ...
# enqueue: '1' queue it, '0' not, 'staging:<ms>' a STAGING job whose deadline is
# registered in the same step (a job can never wait for a stager without one).
# Returns {1, id} (created) or {0, owner} (a live job owns the folder: joined).
CREATE = _JOB_CHANGE + _JOB + """
local enqueue, folder = ARGV[3], KEYS[1]
if folder ~= '' then
  local existing = redis.call('GET', folder)
  if existing then
    local st = redis.call('HGET', P .. ':job:' .. existing, 'status')
    if st and not FOLDER_FREED[st] then return {0, existing} end
  end
  redis.call('SET', folder, id)
  redis.call('HSET', key, 'folder_key', folder)
end
if string.sub(enqueue, 1, 8) == 'staging:' then
  redis.call('ZADD', P .. ':staging', now + tonumber(string.sub(enqueue, 9)), id)
end
set_fields(key, 4)
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

# KEYS: the watcher's mark of the folder ; ARGV: prefix, job_id, mark_ms, field, value, ...
# A folder the watcher cannot complete: its job, already ended (ERROR, with the reason in
# its fields), and the mark naming it, in one step (no second job for the folder, ever).
WATCH_FAILED = _JOB_CHANGE + _JOB + """
set_fields(key, 4)
redis.call('ZADD', P .. ':jobs', now, id)
redis.call('SET', KEYS[1], id, 'PX', tonumber(ARGV[3]))
emit(P, id)
forget_later(P, id, key)
return 1
"""

# -- a worker's claim ---------------------------------------------------------

# ARGV: prefix, token, holder, lease_ms, iso_now, per_user_limit (0: none), max_scan ;
# returns job_id or false. The oldest job (the tail of the queue) whose user is
# below the limit is taken; jobs of users at their limit stay queued in order.
CLAIM = _CONSTANTS + _NOW + _EVENTS + """
local P, token, holder, lease, iso = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local limit, max_scan = tonumber(ARGV[6] or '0'), tonumber(ARGV[7] or '1000')
local q = P .. ':queue'
local function take(id, key)
  redis.call('ZADD', P .. ':active', now + lease, id)
  redis.call('HSET', key, 'claim', token, 'lease_host', holder, 'status', TRANSFERRING)
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
    if CLAIMABLE[redis.call('HGET', key, 'status')] then return take(id, key) end
  end
end
local i = -1
local scanned = 0
while scanned < max_scan do
  local id = redis.call('LINDEX', q, i)
  if not id then return false end
  scanned = scanned + 1
  local key = P .. ':job:' .. id
  if not CLAIMABLE[redis.call('HGET', key, 'status')] then
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

# ARGV: prefix, id, token, lease_ms, field, value, ... ; returns the job's status, or false
# when the claim is lost. Progress is recorded only while copying: a cancelled job keeps
# what its cancel recorded.
HEARTBEAT = _CONSTANTS + _NOW + _EVENTS + _HELD + _JOB + """
local token, lease = ARGV[3], tonumber(ARGV[4])
if not held(key, token) then return false end
redis.call('ZADD', P .. ':active', 'XX', now + lease, id)
local st = redis.call('HGET', key, 'status')
if st == TRANSFERRING then
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

# ARGV: prefix, id, token, iso_now, field, value, ... ; 1 when the claim holds and the job, still
# copying and within its timeout_seconds, may publish (its publish record is set), else 0 (a job
# past its timeout_seconds ends in ERROR 'timeout' here)
FENCE = _FAIL + _UNCOUNT + _HELD + _JOB + """
if not held(key, ARGV[3]) or redis.call('HGET', key, 'status') ~= TRANSFERRING then return 0 end
local due = redis.call('ZSCORE', P .. ':deadlines', id)
if due and tonumber(due) <= now then
  -- Past its timeout_seconds: it ends here instead of publishing late (the deadline sweep runs
  -- once a second and leaves alone a job that passed this fence).
  redis.call('ZREM', P .. ':deadlines', id)
  uncount(P, key)
  fail(P, id, key, ARGV[4], R_TIMEOUT,
       TIMEOUT_DETAIL .. (redis.call('HGET', key, 'timeout_seconds') or '?') .. ' seconds')
  return 0
end
set_fields(key, 5)
redis.call('HSET', key, 'publishing', ARGV[3])
return 1
"""

# ARGV: prefix, id, token ; a new attempt found no folder published by a dead one: cancellable
# again. 1, or 0 when the claim is lost.
UNFENCE = _HELD + _JOB + """
if not held(key, ARGV[3]) then return 0 end
redis.call('HDEL', key, 'publishing', 'publish_tmp', 'publish_dev', 'publish_ino')
return 1
"""

# ARGV: prefix, id, token, record ; 1 when the claim holds (the record replaces its attempt's
# earlier one), 0 when it is lost
ADD_TEMP = _TEMP_WORDS + _HELD + _JOB + """
if not held(key, ARGV[3]) then return 0 end
local out = temp_words(key, {[string.match(ARGV[4], '^[^:]+')] = true})
table.insert(out, ARGV[4])
set_words(key, out)
return 1
"""

# ARGV: prefix, id, attempt, ... ; forget these attempts' records (their folders are gone or
# not ours). 1, or 0 when the job is gone.
DROP_TEMPS = _TEMP_WORDS + _JOB + """
if redis.call('EXISTS', key) == 0 then return 0 end
local drop = {}
for i = 3, #ARGV do drop[ARGV[i]] = true end
set_words(key, temp_words(key, drop))
return 1
"""

# ARGV: prefix, id, token, status, iso_now, field, value, ... ; returns the status the job
# ends in (an ended job, e.g. cancelled meanwhile, keeps its own), or false when the claim is lost
FINISH = _JOB_CHANGE + _UNCOUNT + _HELD + _JOB + """
local token, status, iso = ARGV[3], ARGV[4], ARGV[5]
if not held(key, token) then return false end
redis.call('ZREM', P .. ':active', id)
redis.call('ZREM', P .. ':deadlines', id)
uncount(P, key)
redis.call('HDEL', key, 'claim', 'publishing')
local st = redis.call('HGET', key, 'status')
if ENDED[st] then
  forget_later(P, id, key)
  return st
end
redis.call('HSET', key, 'status', status, 'time_' .. string.lower(status), iso)
set_fields(key, 6)
emit(P, id)
forget_later(P, id, key)
return status
"""

# ARGV: prefix, id, token, detail ; hand a claimed job back to the front of the queue.
# Returns 1 (handed back), 0 (the claim had moved on) or 2 (refused: the job passed its
# publish fence and may be published; its holder keeps it and records the result).
RELEASE = _JOB_CHANGE + _REQUEUE + _HELD + _JOB + """
if not held(key, ARGV[3]) then return 0 end
if redis.call('HEXISTS', key, 'publishing') == 1 then return 2 end
requeue(P, id, key, ARGV[4])
return 1
"""

# ARGV: prefix, detail[, id, token] ; requeue jobs whose lease lapsed (or one given job
# whose holder is known dead); returns {requeued..., '|', ended...}
RECOVER = _JOB_CHANGE + _REQUEUE + _HELD + """
local P, detail = ARGV[1], ARGV[2]
local ids
if ARGV[3] then
  if not held(P .. ':job:' .. ARGV[3], ARGV[4]) then return {'|'} end
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
GIVE_UP = _FAIL + _UNCOUNT + _HELD + _JOB + """
if not held(key, ARGV[3]) or redis.call('HEXISTS', key, 'publishing') == 1
    or redis.call('HGET', key, 'status') ~= TRANSFERRING then
  return 0
end
set_fields(key, 7)
redis.call('ZREM', P .. ':deadlines', id)
uncount(P, key)
fail(P, id, key, ARGV[4], ARGV[5], ARGV[6])
return 1
"""

# -- requests on a job --------------------------------------------------------

# ARGV: prefix, id, iso_now, detail ; returns OK | NOTFOUND | PUBLISHING | <final status>
CANCEL = _JOB_CHANGE + _JOB + """
local iso, detail = ARGV[3], ARGV[4]
local st = redis.call('HGET', key, 'status')
if not st then return 'NOTFOUND' end
if ENDED[st] then return st end
if redis.call('HEXISTS', key, 'publishing') == 1 then return 'PUBLISHING' end
redis.call('HSET', key, 'status', CANCELLED, 'time_cancelled', iso, 'reason', R_CANCELLED,
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
# Returns OK | NOTFOUND | NOTSTAGING | BADCODE. A staged job takes the folder key (unless a
# live job already owns it), so a later /complete_transfer for the same user and folder is
# a repeat of it.
STAGED = _JOB_CHANGE + _JOB + """
local code, success, iso = ARGV[3], ARGV[4], ARGV[5]
local st = redis.call('HGET', key, 'status')
if not st then return 'NOTFOUND' end
if st ~= STAGING then return 'NOTSTAGING' end
local h = redis.call('HGET', key, 'authcode_hash')
if (not h) or h ~= code then return 'BADCODE' end
redis.call('HDEL', key, 'authcode_hash')
redis.call('ZREM', P .. ':staging', id)
set_fields(key, 6)
if success == '1' then
  redis.call('HSET', key, 'status', SUBMITTED, 'time_staged', iso)
  redis.call('HSETNX', key, 'time_submitted', iso)
  redis.call('LPUSH', P .. ':queue', id)
  if KEYS[1] ~= '' then
    local owner = redis.call('GET', KEYS[1])
    local ost = owner and redis.call('HGET', P .. ':job:' .. owner, 'status')
    if (not ost) or FOLDER_FREED[ost] then
      redis.call('SET', KEYS[1], id)
      redis.call('HSET', key, 'folder_key', KEYS[1])
    end
  end
else
  redis.call('HSET', key, 'status', ERROR, 'time_error', iso, 'reason', R_STAGING_FAILED)
end
emit(P, id)
if success ~= '1' then forget_later(P, id, key) end
return 'OK'
"""

# -- housekeeping -------------------------------------------------------------

# ARGV: prefix, iso_now ; jobs past their timeout_seconds end in ERROR 'timeout' (at most 100 a
# call); returns their ids. A claimed job keeps its claim, as with a cancel: its worker sees the
# ended status at its next heartbeat and stops; a job that may already be publishing is left to finish.
SWEEP_DEADLINES = _FAIL + _UNCOUNT + """
local P = ARGV[1]
""" + _SWEEP + """
return sweep(P .. ':deadlines', 100, ARGV[2], R_TIMEOUT, TIMEOUT_DETAIL, 'timeout_seconds',
  function(id, key)
    local st = redis.call('HGET', key, 'status')
    if (not st) or ENDED[st] or redis.call('HEXISTS', key, 'publishing') == 1 then return false end
    redis.call('LREM', P .. ':queue', 0, id)
    redis.call('ZREM', P .. ':staging', id)
    if redis.call('HEXISTS', key, 'claim') == 0 then redis.call('ZREM', P .. ':active', id) end
    uncount(P, key)
    return true
  end)
"""

# ARGV: prefix, iso_now ; jobs whose staging deadline passed end in ERROR; returns their ids
SWEEP_STAGING = _FAIL + """
local P = ARGV[1]
""" + _SWEEP + """
return sweep(P .. ':staging', -1, ARGV[2], R_STAGING_TIMEOUT, 'the stager did not report within ', 'staging_timeout',
  function(id, key) return redis.call('HGET', key, 'status') == STAGING end)
"""

# ARGV: prefix, max_due, walk, retain_ms ; returns {index entries dropped, jobs scheduled}.
# (1) Jobs whose retention is up leave the index (``P:jobs``) and ``P:expiring``.
# (2) A cursor walks ``walk`` entries of ``P:jobs`` per call: an entry whose job is
#     gone (deleted by hand, or lost) is dropped, and an ended job that has no expiry
#     (made before retention existed) is scheduled with ``retain_ms``, so every job is
#     forgotten in time.
TRIM = _CONSTANTS + _NOW + _FORGET + """
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
    if ttl == -1 and redis.call('HEXISTS', key, 'claim') == 0 and ENDED[redis.call('HGET', key, 'status')] then
      forget_later(P, id, key, retain)
      scheduled = scheduled + 1
    end
  end
end
if #batch < walk then cur = 0 else cur = cur + kept end
if cur ~= was then redis.call('SET', P .. ':trim_cursor', cur) end  -- an idle trim writes nothing
return {dropped, scheduled}
"""

# ARGV: prefix, user or '', status or '', limit, scan ; returns {id, {field, value, ...}, ...} newest first
LIST = """
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

# -- the watcher's marks ------------------------------------------------------

# The watcher's mark outlives the folder's job: a job is forgotten after the retention,
# but the folder may stay in the DTS area for ever, and a watcher that found no mark
# would deliver it again (a restart has no memory). So the mark gets its own TTL,
# ``mark_ms`` (at least the retention, at least WATCH_MARK_MS), which the watcher renews
# while it sees the folder (WATCHED_KEEP), and cuts to the retention when the folder
# has left the DTS area (WATCHED_GONE): marks are bounded by the folders present plus
# those removed within the retention (or WATCH_MARK_MS, for removals no watcher saw).
# KEYS: the mark ; ARGV: prefix, job id, mark_ms
WATCHED_DONE = """
redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
return 1
"""

# KEYS: the mark ; ARGV: prefix, mark_ms ; the folder is still there: keep its mark (or put back
# one lost with Redis's data: this process knows the folder is done). A taker's mark
# (``taking:…``) keeps its own short expiry.
WATCHED_KEEP = """
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
# 1, or 0 when there is no done mark.
WATCHED_GONE = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 7) == 'taking:' then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 or ttl > tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
return 1
"""

# KEYS: a probe key ; ARGV: prefix ; /healthz's question "are writes taken now?": a write, at
# once undone. Refused like any write (OOM under noeviction, READONLY on a replica); leaves nothing.
PROBE_WRITE = """
redis.call('SET', KEYS[1], '1')
redis.call('DEL', KEYS[1])
return 1
"""
