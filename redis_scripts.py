"""The Lua scripts behind redis_backend.py: every change to an execution's record and log is one
of these, so each is atomic. Loaded once per connection pool (EVALSHA; reloaded after a Redis restart).

    from redis_scripts import SCRIPTS        # name -> Lua source (COMMON_LUA prepended by the caller)

Contracts, in short (each script's comment says its ARGV and replies):
- submit:    a new PENDING record, its seq-1 event, a queue entry; idempotent per submit token.
- take:      PENDING -> RUNNING with a lease (TTL) and a new epoch, the RUNNING event, and the queue
             entry acknowledged and deleted in the same step. Skips terminal and running ones.
- append:    the owner's events: a seq already stored is acknowledged again, a gap is refused with
             the last stored seq, a stale epoch or a lost lease is refused; a terminal phase event
             updates the record, drops the lease and starts the retention clock.
- heartbeat: renews the owner's lease; refused once the lease is gone.
- cancel:    ends a PENDING execution CANCELLED at once; flags a RUNNING one for its owner.
- end:       an outsider ends an execution (runner lost, cancel not confirmed, dead letter),
             only while the condition holds, writing the events Python built for the seq it expected.
"""

# KEYS (the same 14 for every script): 1 ex:ID, 2 lease:ID, 3 events:ID, 4 queue, 5 dead, 6 leases,
# 7 cancels, 8 epoch, 9 index:all, 10..14 index:PHASE for PENDING..CANCELLED.
# ARGV 1..3 for every script: execution id, now (unix seconds), retention (ms); the rest per script.

COMMON_LUA = """
local EX, LEASE, EVENTS, QUEUE, DEAD = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local LEASES, CANCELS, EPOCH = KEYS[6], KEYS[7], KEYS[8]
local ID, NOW, RETENTION = ARGV[1], ARGV[2], ARGV[3]
local TERMINAL = {[3] = true, [4] = true, [5] = true}
local function field(name) return redis.call('HGET', EX, name) end
local function num(name) return tonumber(redis.call('HGET', EX, name) or '0') end
local function set_phase(new)
  redis.call('ZREM', KEYS[9 + num('phase')], ID)
  redis.call('ZADD', KEYS[9 + new], field('created_at'), ID)
  redis.call('HSET', EX, 'phase', new)
end
local function store(seq, payload)
  redis.call('XADD', EVENTS, '0-' .. seq, 'e', payload)
  redis.call('HSET', EX, 'last_seq', seq)
end
local function finish(phase, reason, final_text, turns)
  set_phase(phase)
  redis.call('HSET', EX, 'finished_at', NOW, 'error', reason, 'final_text', final_text)
  if (tonumber(turns) or 0) > 0 then redis.call('HSET', EX, 'turns', turns) end
  redis.call('DEL', LEASE)
  redis.call('ZREM', LEASES, ID)
  redis.call('ZREM', CANCELS, ID)
  redis.call('PEXPIRE', EX, RETENTION)
  redis.call('PEXPIRE', EVENTS, RETENTION)
end
"""

# ARGV 4 spec bytes, 5 the PENDING event (seq 1), 6 a submit token (a retried submit finds its own record).
# KEYS[4] is the execution's queue (queue:RUNNER when pinned), kept in the record's 'queue' field.
# -> the queue entry id; 0 when the id is taken by another submit.
SUBMIT_LUA = """
if redis.call('EXISTS', EX) == 1 then
  if field('token') == ARGV[6] then return field('entry') end
  return 0
end
local entry = redis.call('XADD', QUEUE, '*', 'id', ID)
redis.call('HSET', EX, 'id', ID, 'spec', ARGV[4], 'phase', 1, 'created_at', NOW, 'started_at', 0,
           'finished_at', 0, 'runner_id', '', 'usage', '', 'final_text', '', 'error', '', 'last_seq', 0,
           'turns', 0, 'epoch', 0, 'owner_seq', 0, 'cancel_at', 0, 'entry', entry, 'token', ARGV[6],
           'queue', QUEUE)
store(1, ARGV[5])
redis.call('ZADD', KEYS[9], NOW, ID)
redis.call('ZADD', KEYS[10], NOW, ID)
return entry
"""

# ARGV 4 group, 5 queue entry id, 6 runner id, 7 lease ttl (ms), 8 expected last_seq,
# 9 the RUNNING event (seq expected+1), 10 lease deadline (unix ms).
# -> {'taken', epoch, HGETALL}; {'skip', phase} (terminal or already running: never run twice);
#    {'gone'}; {'retry', last_seq}. Skips acknowledge and delete the queue entry; so does a take.
TAKE_LUA = """
local function done_with_entry()
  redis.call('XACK', QUEUE, ARGV[4], ARGV[5])
  redis.call('XDEL', QUEUE, ARGV[5])
end
if redis.call('EXISTS', EX) == 0 then done_with_entry(); return {'gone'} end
local phase = num('phase')
if phase == 2 and field('runner_id') == ARGV[6] and field('entry') == ARGV[5]
   and redis.call('GET', LEASE) == field('epoch') then
  done_with_entry()
  return {'taken', field('epoch'), redis.call('HGETALL', EX)}  -- a retried take of our own
end
if phase ~= 1 or redis.call('EXISTS', LEASE) == 1 then done_with_entry(); return {'skip', phase} end
local last = num('last_seq')
if last ~= tonumber(ARGV[8]) then return {'retry', last} end
local epoch = redis.call('INCR', EPOCH)
redis.call('SET', LEASE, epoch, 'PX', ARGV[7])
redis.call('ZADD', LEASES, ARGV[10], ID)
set_phase(2)
store(last + 1, ARGV[9])
redis.call('HSET', EX, 'started_at', NOW, 'runner_id', ARGV[6], 'epoch', epoch, 'owner_seq', last + 1,
           'lease_ms', ARGV[7])
done_with_entry()
return {'taken', tostring(epoch), redis.call('HGETALL', EX)}
"""

# ARGV 4 epoch, 5 n, then 7 per event: seq, serialized Event, kind, and for a phase event
# (phase, reason, final_text, turns), for a usage event (serialized Usage).
# -> {'ok', ack_seq, phase}; {'gap', ack_seq, why}; {'stale', ack_seq, why}; {'invalid', ack_seq, why};
#    {'gone', 0, why}. A seq the owner already stored is skipped (acknowledged again); events before
#    a refusal in the same call are stored and covered by ack_seq.
APPEND_LUA = """
if redis.call('EXISTS', EX) == 0 then return {'gone', 0, 'no execution ' .. ID .. ' (expired or never submitted)'} end
local epoch, owner, last, phase = field('epoch'), num('owner_seq'), num('last_seq'), num('phase')
if epoch ~= ARGV[4] then
  return {'stale', owner, 'epoch ' .. ARGV[4] .. ' does not own ' .. ID .. ' (epoch ' .. epoch .. ' does)'}
end
local leased = redis.call('GET', LEASE) == epoch
for i = 0, tonumber(ARGV[5]) - 1 do
  local b = 6 + i * 7
  local seq, kind = tonumber(ARGV[b]), ARGV[b + 2]
  if seq > owner then
    if not leased or phase ~= 2 then
      local why = TERMINAL[phase] and ('execution ' .. ID .. ' already ended at seq ' .. last)
                  or ('the lease on ' .. ID .. ' expired')
      return {'stale', owner, why .. ': stop sending events for it'}
    end
    if seq ~= last + 1 then
      return {'gap', last, 'seq gap for ' .. ID .. ': got ' .. seq .. ', expected ' .. (last + 1) ..
                            '; resend after ' .. last}
    end
    local p = tonumber(ARGV[b + 3]) or 0
    if kind == '' or (kind == 'phase' and (p < 2 or p > 5)) then
      return {'invalid', last, 'event ' .. seq .. ' of ' .. ID .. ' has no payload or a phase a runner may not set'}
    end
    store(seq, ARGV[b + 1])
    last, owner = seq, seq
    redis.call('HSET', EX, 'owner_seq', seq)
    if kind == 'usage' then
      redis.call('HSET', EX, 'usage', ARGV[b + 3])
    elseif kind == 'phase' then
      if TERMINAL[p] then
        finish(p, ARGV[b + 4], ARGV[b + 5], ARGV[b + 6])
        phase, leased = p, false
      elseif (tonumber(ARGV[b + 6]) or 0) > 0 then
        redis.call('HSET', EX, 'turns', ARGV[b + 6])
      end
    end
  end
end
return {'ok', owner, phase}
"""

# ARGV 4 epoch, 5 lease ttl (ms), 6 new deadline (unix ms).
# -> {1, seq} renewed; {2, seq} the owner itself ended it; {0, seq} the lease is lost (fenced).
HEARTBEAT_LUA = """
if redis.call('EXISTS', EX) == 0 then return {0, 0} end
local owner = num('owner_seq')
if field('epoch') ~= ARGV[4] then return {0, owner} end
if redis.call('GET', LEASE) == ARGV[4] and num('phase') == 2 then
  redis.call('PEXPIRE', LEASE, ARGV[5])
  redis.call('ZADD', LEASES, ARGV[6], ID)
  return {1, owner}
end
if TERMINAL[num('phase')] and owner == num('last_seq') then return {2, owner} end
return {0, owner}
"""

# ARGV 4 expected last_seq, 5 the CANCELLED event (for a PENDING one), 6 group, 7 reason.
# -> 'cancelled' (it was PENDING: ended now), 'requested' (RUNNING: its owner will stop it),
#    'ended' (already terminal), 'gone', 'retry'.
CANCEL_LUA = """
if redis.call('EXISTS', EX) == 0 then return 'gone' end
local phase = num('phase')
if phase == 1 then
  if num('last_seq') ~= tonumber(ARGV[4]) then return 'retry' end
  store(num('last_seq') + 1, ARGV[5])
  redis.call('XACK', QUEUE, ARGV[6], field('entry'))
  redis.call('XDEL', QUEUE, field('entry'))
  finish(5, ARGV[7], '', 0)
  return 'cancelled'
elseif phase == 2 then
  if num('cancel_at') == 0 then
    redis.call('HSET', EX, 'cancel_at', NOW)
    redis.call('ZADD', CANCELS, NOW, ID)
  end
  return 'requested'
end
return 'ended'
"""

# An outsider ends an execution. ARGV 4 mode, 5 expected last_seq, 6 terminal phase, 7 reason,
# 8 mode argument, 9 queue entry (dead), 10 n, 11.. the events to write (seq expected+1...).
#   lost:   RUNNING and its lease gone (expired);           8 unused
#   cancel: RUNNING and cancel asked for at or before ARG8 (the worker did not confirm in time)
#   dead:   PENDING; its queue entry ARG9 goes to the dead-letter stream; 8 is the group
# -> {'ended', last_seq}; {'no'} (the condition does not hold); {'retry', last_seq}; {'gone'}.
END_LUA = """
if redis.call('EXISTS', EX) == 0 then return {'gone'} end
local mode, phase = ARGV[4], num('phase')
if mode == 'lost' then
  if phase ~= 2 then redis.call('ZREM', LEASES, ID); return {'no'} end
  if redis.call('EXISTS', LEASE) == 1 then return {'no'} end
elseif mode == 'cancel' then
  if phase ~= 2 then redis.call('ZREM', CANCELS, ID); return {'no'} end
  local at = num('cancel_at')
  if at == 0 or at > tonumber(ARGV[8]) then return {'no'} end
elseif mode == 'dead' then
  if phase ~= 1 then
    redis.call('XACK', QUEUE, ARGV[8], ARGV[9]); redis.call('XDEL', QUEUE, ARGV[9])
    return {'no'}
  end
else
  return redis.error_reply('unknown end mode ' .. mode)
end
local last = num('last_seq')
if last ~= tonumber(ARGV[5]) then return {'retry', last} end
if mode == 'dead' then
  redis.call('XADD', DEAD, 'MAXLEN', '~', 10000, '*', 'id', ID, 'entry', ARGV[9], 'reason', ARGV[7])
  redis.call('XACK', QUEUE, ARGV[8], ARGV[9]); redis.call('XDEL', QUEUE, ARGV[9])
end
local n = tonumber(ARGV[10])
for i = 1, n do store(last + i, ARGV[10 + i]) end
finish(tonumber(ARGV[6]), ARGV[7], '', 0)
return {'ended', last + n}
"""

SCRIPTS = {"submit": SUBMIT_LUA, "take": TAKE_LUA, "append": APPEND_LUA, "heartbeat": HEARTBEAT_LUA,
           "cancel": CANCEL_LUA, "end": END_LUA}
