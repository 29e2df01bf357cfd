-- The Redis store's one script (gateway/store/redis.py): every change to a session or a
-- budget, each done atomically on the server, so that no number of replicas overshoots a
-- limit. Loaded once, called by its SHA. The rules are gateway/store/base.py's (check_and_reserve,
-- settle, absorb, SessionRecord.note), written again here because they must run where the
-- figures are; tests/store/test_base.py runs the same contract against both.
--
-- KEYS: 1 the session, 2 its qualified id (another key's session), 3 the session index,
--       4 the lease deadlines, 5 the leases, 6 the budget index, 7.. the budgets.
-- ARGV: 1 op, 2 now, 3 retention of idle sessions, 4 retention of ended ones (seconds, '' for
--       ever), 5 the layout version this replica writes; then the op's own.
-- Numbers come in as strings; floats go back as strings (a Lua number returned is cut to an
-- integer).

-- ARGV[1] is the op, or for a write queued by a replica 'op:replica:number': its writes are
-- numbered in the order it sends them, and one sent again after a lost connection (it may
-- have run) is skipped, so that nothing is counted twice.
local op, writer, number = string.match(ARGV[1], '^([a-z]+):?([0-9a-f]*):?([0-9]*)$')
local now = tonumber(ARGV[2])
local LAYOUT_KEY = string.gsub(KEYS[3], ':si$', ':layout')
local EVENTS_KEPT, REWRITES_KEPT, BUDGET_GRACE = 20, 3, 300
local MODELS_KEPT, OTHER_MODELS = 32, '(other models)'

local layout = redis.call('GET', LAYOUT_KEY)
if layout ~= ARGV[5] then
  return {'layout', layout or ''}
end

if writer ~= nil and writer ~= '' then
  local written = string.gsub(KEYS[3], ':si$', ':w:') .. writer
  if tonumber(number) <= tonumber(redis.call('GET', written) or '0') then
    return {'again'}
  end
  redis.call('SET', written, number, 'EX', 604800)
end

local function num(key, field)
  return tonumber(redis.call('HGET', key, field) or '0') or 0
end

local function fmt(x)
  return string.format('%.17g', x)
end

local function split(text, sep)
  local parts, from = {}, 1
  while true do
    local at = string.find(text, sep, from, true)
    if not at then
      table.insert(parts, string.sub(text, from))
      return parts
    end
    table.insert(parts, string.sub(text, from, at - 1))
    from = at + 1
  end
end

local function decoded(key, field)
  local raw = redis.call('HGET', key, field)
  if not raw then
    return {}
  end
  return cjson.decode(raw)
end

local function is_set(value)
  return value ~= nil and value ~= cjson.null
end

-- ident: key_hash, source, agent, name, team, principal (strings, '' for none)
local function ident_at(first)
  return {
    key_hash = ARGV[first], source = ARGV[first + 1], agent = ARGV[first + 2],
    name = ARGV[first + 3], team = ARGV[first + 4], principal = ARGV[first + 5],
  }
end

-- Revisions come from one counter of the gateway's, never from the session's own: a session
-- that expired and began again never matches a copy of the one before (no ABA).
local function next_rev()
  return redis.call('INCR', (string.gsub(KEYS[3], ':si$', ':rev')))
end

local function create(key, id, ident, at)
  redis.call('HSET', key, 'id', id, 'source', ident.source, 'agent', ident.agent,
    'first_seen', at, 'last_seen', at, 'status', 'active', 'rev', next_rev())
  for _, field in ipairs({'name', 'key_hash', 'team', 'principal'}) do
    if ident[field] ~= '' then
      redis.call('HSET', key, field, ident[field])
    end
  end
end

local function owner(key)
  return redis.call('HGET', key, 'key_hash') or ''
end

-- The caller's own session (identity.own_session): the id it named when that is new or its
-- key's, else the qualified id; nil when both are another key's.
local function own(ident, id, qualified_id)
  if redis.call('EXISTS', KEYS[1]) == 0 or owner(KEYS[1]) == ident.key_hash then
    return KEYS[1], id, 1
  end
  if redis.call('EXISTS', KEYS[2]) == 0 or owner(KEYS[2]) == ident.key_hash then
    return KEYS[2], qualified_id, 2
  end
  return nil, nil, 0
end

local function touch(key, ident, at)
  if tonumber(at) > num(key, 'last_seen') then
    redis.call('HSET', key, 'last_seen', at)
  end
  if ident.name ~= '' then
    redis.call('HSET', key, 'name', ident.name)
  end
  if redis.call('HGET', key, 'agent') == 'unknown' then
    redis.call('HSET', key, 'agent', ident.agent)
  end
end

-- After every change: the index's order, and the session's expiry by the retention.
-- A session's 'rev' counts the changes a call's decision reads: a replica that decided on a
-- copy it kept is told by 'begin' when the copy is behind. Not aux calls and notes (no
-- decision reads them), nor a turn's beginning: what it changes (turns, reservations) is
-- checked by 'begin' itself, and a call decided while another is in flight reads what was
-- settled, as it would have read it a moment earlier.
local function changed(key, id)
  if op ~= 'aux' and op ~= 'note' and op ~= 'begin' then
    redis.call('HSET', key, 'rev', next_rev())
  end
  local last = num(key, 'last_seen')
  redis.call('ZADD', KEYS[3], last, id)
  local keep = nil
  if ARGV[3] ~= '' then
    keep = tonumber(ARGV[3])
  end
  if ARGV[4] ~= '' and redis.call('HGET', key, 'status') == 'ended' then
    local ended = tonumber(ARGV[4])
    if keep == nil or ended < keep then
      keep = ended
    end
  end
  if keep ~= nil then
    redis.call('EXPIREAT', key, math.ceil(last + keep))
  else
    redis.call('PERSIST', key)
  end
end

-- Events and rewrites are kept as the JSON texts the gateway sent, in a JSON list of strings:
-- cjson would write them back changed (an empty list as {}, numbers to 14 digits).
local function as_table(item)
  if type(item) == 'string' then
    return cjson.decode(item)
  end
  return item
end

local function note(key, kind, event_json)
  local events = decoded(key, kind)
  local event = cjson.decode(event_json)
  local last = events[#events] and as_table(events[#events])
  if is_set(event.key) and last ~= nil and last.key == event.key then
    local times = (tonumber(last.times) or 1) + 1
    local first_at = last.first_at
    if not is_set(first_at) then
      first_at = last.at
    end
    local whole = true  -- the new event names every field of the last: it stands as sent
    for name, _ in pairs(last) do
      if event[name] == nil and name ~= 'times' and name ~= 'first_at' then
        whole = false
      end
    end
    if whole and string.sub(event_json, 1, 1) == '{' then
      local head = '{"times":' .. times
      if type(first_at) == 'number' then
        head = head .. ',"first_at":' .. fmt(first_at)
      elseif is_set(first_at) then
        head = head .. ',"first_at":' .. cjson.encode(first_at)
      end
      local rest = string.sub(event_json, 2)
      if rest ~= '}' then
        head = head .. ','
      end
      events[#events] = head .. rest
    else
      for name, value in pairs(event) do
        last[name] = value
      end
      last.times, last.first_at = times, first_at
      events[#events] = cjson.encode(last)
    end
  else
    table.insert(events, event_json)
    while #events > EVENTS_KEPT do
      table.remove(events, 1)
    end
  end
  redis.call('HSET', key, kind, cjson.encode(events))
end

local function floor0(x)
  if x < 0 then
    return 0
  end
  return x
end

local function release_session(key, tokens)
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'in_flight', floor0(num(key, 'in_flight') - 1),
      'reserved_tokens', floor0(num(key, 'reserved_tokens') - tokens))
  end
end

local function release_budget(key, tokens, cost)
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'reserved_tokens', floor0(num(key, 'reserved_tokens') - tokens),
      'reserved_cost', fmt(floor0(num(key, 'reserved_cost') - cost)))
  end
end

-- Leases whose replica stopped renewing them (it died mid-call): their reservations freed.
-- Lease deadlines are Redis's own clock, not a replica's: a replica whose clock runs ahead
-- does not free the others' reservations early.
local function server_time()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) + tonumber(clock[2]) / 1e6
end

-- The name a call's figures go under (records.py's model_slot): past MODELS_KEPT models,
-- OTHER_MODELS.
local function model_slot(models, name)
  if models[name] ~= nil then
    return name
  end
  local count = 0
  for _ in pairs(models) do
    count = count + 1
  end
  if count < MODELS_KEPT then
    return name
  end
  return OTHER_MODELS
end

local function reclaim()
  local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', server_time(), 'LIMIT', 0, 32)
  for _, lease in ipairs(gone) do
    local entry = redis.call('HGET', KEYS[5], lease)
    if entry then
      local parts = split(entry, '\t')
      local tokens, cost = tonumber(parts[2]), tonumber(parts[3])
      release_session(parts[1], tokens)
      for i = 4, #parts do
        release_budget(parts[i], tokens, cost)
      end
    end
    redis.call('HDEL', KEYS[5], lease)
    redis.call('ZREM', KEYS[4], lease)
  end
end

local function all(key)
  return redis.call('HGETALL', key)
end

local function tightest(key, field, value)
  if value == '' then
    return
  end
  local current = redis.call('HGET', key, field)
  if current == false or tonumber(value) < tonumber(current) then
    redis.call('HSET', key, field, value)
  end
end

-- begin: ARGV 6-11 ident, 12 id, 13 qualified id, 14 user turn (0/1), 15 reserve tokens,
-- 16 reserve cost, 17 max_turns, 18 max_session_tokens, 19 idle_timeout, 20 lease,
-- 21 lease length (seconds), 22 the session's rev the call was decided on ('' for not
-- checked), then per budget (KEYS 7..): window end, max tokens, max cost, max requests, its
-- key as the policy names it.
local function begin()
  reclaim()
  local ident = ident_at(6)
  local key, id, which = own(ident, ARGV[12], ARGV[13])
  if key == nil then
    return {'taken', ARGV[13]}
  end
  if ARGV[22] ~= '' and key == KEYS[1] and num(key, 'rev') ~= tonumber(ARGV[22]) then
    -- Changed since the replica's copy (another replica's turn, a grant, a pause): nothing
    -- counted; the session as it is now, for the decision to be made again.
    return {'changed', unpack(redis.call('HGETALL', key))}
  end
  local at = ARGV[2]
  if redis.call('EXISTS', key) == 0 then
    create(key, id, ident, at)
  end
  -- restart_if_idle: a session idle past its timeout starts a fresh count.
  if ARGV[19] ~= '' and num(key, 'in_flight') == 0
      and now - num(key, 'last_seen') > tonumber(ARGV[19]) then
    local status = redis.call('HGET', key, 'status')
    local reason = redis.call('HGET', key, 'status_reason') or ''
    if not (status == 'ended' and reason ~= 'idle') then
      local first_seen = redis.call('HGET', key, 'first_seen')
      local restarts = num(key, 'restarts') + 1
      redis.call('DEL', key)
      create(key, id, ident, at)  -- a new rev: no copy of before matches
      redis.call('HSET', key, 'first_seen', first_seen, 'restarts', restarts)
    end
  end
  local status = redis.call('HGET', key, 'status')
  if status ~= 'active' then
    return {'limit', 'session_' .. status, '0', '0', redis.call('HGET', key, 'status_reason') or '', '0', id}
  end
  local turns = num(key, 'turns')
  local reserve, reserve_cost = tonumber(ARGV[15]), tonumber(ARGV[16])
  local turns_left, tokens_left, tokens_allowed = '', '', ''
  if ARGV[17] ~= '' then
    local allowed = tonumber(ARGV[17]) + num(key, 'granted_turns')
    if turns >= allowed then
      return {'limit', 'max_turns', fmt(allowed), fmt(turns), '', '0', id}
    end
    turns_left = fmt(allowed - turns - 1)
  end
  if ARGV[18] ~= '' then
    local allowed = tonumber(ARGV[18]) + num(key, 'granted_tokens')
    local used = num(key, 'tokens.input_tokens') + num(key, 'tokens.output_tokens')
      + num(key, 'reserved_tokens')
    if used + reserve > allowed then
      return {'limit', 'max_session_tokens', fmt(allowed), fmt(used), '', '0', id}
    end
    tokens_left, tokens_allowed = fmt(allowed - used - reserve), fmt(allowed)
  end
  local budgets = #KEYS - 6
  for i = 1, budgets do
    local budget, base = KEYS[6 + i], 22 + 5 * (i - 1)
    local max_tokens, max_cost, max_requests = ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
    local requests = num(budget, 'requests')
    if max_requests ~= '' and requests >= tonumber(max_requests) then
      return {'limit', 'budget_requests', max_requests, fmt(requests), '', tostring(i), id}
    end
    if max_tokens ~= '' then
      local used = num(budget, 'tokens') + num(budget, 'reserved_tokens')
      if used + reserve > tonumber(max_tokens) then
        return {'limit', 'budget_tokens', max_tokens, fmt(used), '', tostring(i), id}
      end
    end
    if max_cost ~= '' then
      local spent = num(budget, 'cost') + num(budget, 'reserved_cost')
      if spent + reserve_cost > tonumber(max_cost) then
        return {'limit', 'budget_cost', max_cost, string.format('%.6f', spent), '', tostring(i), id}
      end
    end
  end
  if turns > 0 then
    local gap = now - num(key, 'last_seen')
    if gap < 0.05 then
      gap = 0.05
    end
    local rate = 60.0 / gap
    local fast, slow = rate, rate
    if turns > 1 then
      fast = num(key, 'rate_fast')
      slow = num(key, 'rate_slow')
      fast = fast + 0.3 * (rate - fast)
      slow = slow + 0.02 * (rate - slow)
    end
    redis.call('HSET', key, 'rate_fast', fmt(fast), 'rate_slow', fmt(slow))
  end
  touch(key, ident, at)
  redis.call('HINCRBY', key, 'turns', 1)
  if ARGV[14] == '1' then
    redis.call('HINCRBY', key, 'user_turns', 1)
  end
  redis.call('HINCRBY', key, 'in_flight', 1)
  redis.call('HINCRBY', key, 'reserved_tokens', reserve)
  local lease = {key, ARGV[15], ARGV[16]}
  local seen = {}
  for i = 1, budgets do
    local budget, base = KEYS[6 + i], 22 + 5 * (i - 1)
    if seen[budget] == nil then
      seen[budget] = true
      local window_end = tonumber(ARGV[base + 1])
      if redis.call('EXISTS', budget) == 0 then
        redis.call('HSET', budget, 'key', ARGV[base + 5], 'window_end', ARGV[base + 1])
        redis.call('ZADD', KEYS[6], window_end, ARGV[base + 5])
      end
      redis.call('EXPIREAT', budget, math.ceil(window_end + BUDGET_GRACE))
      redis.call('HDEL', budget, 'max_tokens', 'max_cost', 'max_requests')
      redis.call('HINCRBY', budget, 'requests', 1)
      redis.call('HINCRBY', budget, 'reserved_tokens', reserve)
      redis.call('HINCRBYFLOAT', budget, 'reserved_cost', ARGV[16])
      table.insert(lease, budget)
    end
    tightest(budget, 'max_tokens', ARGV[base + 2])
    tightest(budget, 'max_cost', ARGV[base + 3])
    tightest(budget, 'max_requests', ARGV[base + 4])
  end
  redis.call('ZADD', KEYS[4], fmt(server_time() + tonumber(ARGV[21])), ARGV[20])
  redis.call('HSET', KEYS[5], ARGV[20], table.concat(lease, '\t'))
  changed(key, id)
  return {'ok', id, fmt(turns + 1), turns_left, tokens_left, tokens_allowed}
end

-- settle: ARGV 6 lease, 7 reserved tokens, 8 reserved cost, 9 status, 10 body hash,
-- 11 model, 12 cost, 13 has usage (0/1), 14-18 usage, 19 estimated (0/1), 20 retries, 21 at.
local function settle()
  local held = redis.call('HDEL', KEYS[5], ARGV[6]) == 1
  redis.call('ZREM', KEYS[4], ARGV[6])
  local key = KEYS[1]
  local reserved, reserved_cost = tonumber(ARGV[7]), tonumber(ARGV[8])
  local input, output = tonumber(ARGV[14]) or 0, tonumber(ARGV[15]) or 0
  if redis.call('EXISTS', key) == 1 then
    if held then
      release_session(key, reserved)
    end
    if tonumber(ARGV[21]) > num(key, 'last_seen') then
      redis.call('HSET', key, 'last_seen', ARGV[21])
    end
    redis.call('HINCRBY', key, 'upstream_retries', ARGV[20])
    if tonumber(ARGV[9]) >= 400 then
      redis.call('HINCRBY', key, 'upstream_errors', 1)
    elseif ARGV[10] ~= '' then
      if redis.call('HGET', key, 'last_body_hash') == ARGV[10] then
        redis.call('HINCRBY', key, 'body_repeats', 1)
      else
        redis.call('HSET', key, 'body_repeats', 1)
      end
      redis.call('HSET', key, 'last_body_hash', ARGV[10])
    end
    local models = decoded(key, 'models')
    local slot = model_slot(models, ARGV[11])
    local model = models[slot]
    if model == nil then
      model = {input_tokens = 0, output_tokens = 0, cache_read_tokens = 0,
        cache_creation_tokens = 0, reasoning_tokens = 0, turns = 0}
      models[slot] = model
    end
    model.turns = model.turns + 1
    redis.call('HINCRBYFLOAT', key, 'cost', ARGV[12])
    if ARGV[13] == '1' then
      local names = {'input_tokens', 'output_tokens', 'cache_read_tokens',
        'cache_creation_tokens', 'reasoning_tokens'}
      for i, name in ipairs(names) do
        local value = tonumber(ARGV[13 + i])
        redis.call('HINCRBY', key, 'tokens.' .. name, value)
        model[name] = model[name] + value
      end
      if ARGV[19] == '1' then
        redis.call('HINCRBY', key, 'estimated_turns', 1)
      end
    end
    redis.call('HSET', key, 'models', cjson.encode(models))
    changed(key, redis.call('HGET', key, 'id'))
  end
  for i = 7, #KEYS do
    local budget = KEYS[i]
    if redis.call('EXISTS', budget) == 1 then
      if held then
        release_budget(budget, reserved, reserved_cost)
      end
      redis.call('HINCRBY', budget, 'tokens', input + output)
      redis.call('HINCRBYFLOAT', budget, 'cost', ARGV[12])
    end
  end
  -- The session as the turn left it: the replica's copy for its next call's decision.
  return {'ok', unpack(redis.call('HGETALL', key))}
end

-- aux, note, compaction: ARGV 6-11 ident, 12 id, 13 qualified id, then their own.
local function record()
  local ident = ident_at(6)
  local key, id = own(ident, ARGV[12], ARGV[13])
  if key == nil then
    return {'taken', ARGV[13]}
  end
  local at = ARGV[2]
  if redis.call('EXISTS', key) == 0 then
    create(key, id, ident, at)
  end
  if op == 'aux' then
    touch(key, ident, at)
    redis.call('HINCRBY', key, 'aux_requests', 1)
  elseif op == 'note' then
    -- 14 kind, 15 event (JSON), 16 rejected (0/1)
    touch(key, ident, at)
    note(key, ARGV[14], ARGV[15])
    if ARGV[16] == '1' then
      redis.call('HINCRBY', key, 'rejected', 1)
    end
  else
    -- compaction: 14 saved tokens, 15 event, 16 rewrite (JSON or ''), 17 has summary usage,
    -- 18-22 its usage, 23 its cost
    redis.call('HINCRBY', key, 'compacted_calls', 1)
    redis.call('HINCRBY', key, 'tokens_saved', ARGV[14])
    if ARGV[15] ~= '' then
      note(key, 'compactions', ARGV[15])
    end
    if ARGV[16] ~= '' then
      local rewrites = decoded(key, 'context_rewrites')
      table.insert(rewrites, ARGV[16])
      while #rewrites > REWRITES_KEPT do
        table.remove(rewrites, 1)
      end
      redis.call('HSET', key, 'context_rewrites', cjson.encode(rewrites))
    end
    if ARGV[17] == '1' then
      redis.call('HINCRBY', key, 'summary_calls', 1)
      local names = {'input_tokens', 'output_tokens', 'cache_read_tokens',
        'cache_creation_tokens', 'reasoning_tokens'}
      for i, name in ipairs(names) do
        redis.call('HINCRBY', key, 'tokens.' .. name, ARGV[17 + i])
      end
      redis.call('HINCRBYFLOAT', key, 'cost', ARGV[23])
    end
  end
  changed(key, id)
  return {'ok', id}
end

-- grant: ARGV 6 turns, 7 tokens, 8 who, 9 the grant's event (JSON).
local function grant()
  local key = KEYS[1]
  if redis.call('EXISTS', key) == 0 then
    return {'none'}
  end
  local status = redis.call('HGET', key, 'status')
  if status == 'ended' then
    return {'ended', all(key)}
  end
  local turns = tonumber(ARGV[6])
  redis.call('HINCRBY', key, 'granted_turns', turns)
  redis.call('HINCRBY', key, 'granted_tokens', ARGV[7])
  local lifted = turns
  if lifted < 1 then
    lifted = 1
  end
  redis.call('HSET', key, 'loops_allowed_until', num(key, 'turns') + lifted)
  note(key, 'grants', ARGV[9])
  if status == 'paused' then
    redis.call('HSET', key, 'status', 'active', 'status_reason', 'granted by ' .. ARGV[8])
  end
  changed(key, redis.call('HGET', key, 'id'))
  return {'ok', all(key)}
end

-- status: ARGV 6 status, 7 reason.
local function set_status()
  local key = KEYS[1]
  if redis.call('EXISTS', key) == 0 then
    return {'none'}
  end
  redis.call('HSET', key, 'status', ARGV[6], 'status_reason', ARGV[7])
  changed(key, redis.call('HGET', key, 'id'))
  return {'ok', all(key)}
end

local SUMMED = {'turns', 'user_turns', 'aux_requests', 'upstream_errors', 'upstream_retries',
  'rejected', 'estimated_turns', 'granted_turns', 'granted_tokens', 'restarts',
  'compacted_calls', 'tokens_saved', 'summary_calls', 'tokens.input_tokens',
  'tokens.output_tokens', 'tokens.cache_read_tokens', 'tokens.cache_creation_tokens',
  'tokens.reasoning_tokens'}
local EVENTS = {'grants', 'warnings', 'detections', 'rejections', 'compactions'}
local STRICTNESS = {active = 0, paused = 1, ended = 2}

local function concat_kept(older, newer, kept)
  local out = {}
  for _, item in ipairs(older) do
    table.insert(out, item)
  end
  for _, item in ipairs(newer) do
    table.insert(out, item)
  end
  while #out > kept do
    table.remove(out, 1)
  end
  return out
end

-- merge: a session counted in this replica's memory while Redis was away, folded into what
-- Redis holds (base.absorb): ARGV 6.. its fields as field, value pairs (JSON for lists).
local function merge()
  local key = KEYS[1]
  local mine = {}
  for i = 6, #ARGV, 2 do
    mine[ARGV[i]] = ARGV[i + 1]
  end
  if redis.call('EXISTS', key) == 0 then
    for name, value in pairs(mine) do
      redis.call('HSET', key, name, value)
    end
    redis.call('HSET', key, 'in_flight', 0, 'reserved_tokens', 0)
    changed(key, mine.id)
    return {'ok'}
  end
  if owner(key) ~= (mine.key_hash or '') then
    return {'taken'}
  end
  local stored_turns = num(key, 'turns')
  for _, name in ipairs(SUMMED) do
    local value = tonumber(mine[name] or '0') or 0
    if value ~= 0 then
      redis.call('HINCRBY', key, name, value)
    end
  end
  redis.call('HINCRBYFLOAT', key, 'cost', mine.cost or '0')
  local models = decoded(key, 'models')
  for model, totals in pairs(cjson.decode(mine.models or '{}')) do
    local slot = model_slot(models, model)
    local into = models[slot]
    if into == nil then
      models[slot] = totals
    else
      for name, value in pairs(totals) do
        into[name] = (tonumber(into[name]) or 0) + value
      end
    end
  end
  redis.call('HSET', key, 'models', cjson.encode(models))
  for _, kind in ipairs(EVENTS) do
    local merged = concat_kept(decoded(key, kind), cjson.decode(mine[kind] or '[]'), EVENTS_KEPT)
    if #merged > 0 then
      redis.call('HSET', key, kind, cjson.encode(merged))
    end
  end
  local rewrites = concat_kept(decoded(key, 'context_rewrites'),
    cjson.decode(mine.context_rewrites or '[]'), REWRITES_KEPT)
  if #rewrites > 0 then
    redis.call('HSET', key, 'context_rewrites', cjson.encode(rewrites))
  end
  local allowed = tonumber(mine.loops_allowed_until or '0') or 0
  if allowed > 0 then
    allowed = allowed + stored_turns
  end
  if allowed > num(key, 'loops_allowed_until') then
    redis.call('HSET', key, 'loops_allowed_until', allowed)
  end
  if tonumber(mine.first_seen) < num(key, 'first_seen') then
    redis.call('HSET', key, 'first_seen', mine.first_seen)
  end
  if tonumber(mine.last_seen) > num(key, 'last_seen') then
    redis.call('HSET', key, 'last_seen', mine.last_seen)
  end
  if mine.name ~= nil then
    redis.call('HSET', key, 'name', mine.name)
  end
  if mine.agent ~= 'unknown' then
    redis.call('HSET', key, 'agent', mine.agent)
  end
  local stored_status = redis.call('HGET', key, 'status')
  if (STRICTNESS[mine.status] or 0) > (STRICTNESS[stored_status] or 0) then
    redis.call('HSET', key, 'status', mine.status, 'status_reason', mine.status_reason or '')
  end
  if mine.last_body_hash ~= nil then
    redis.call('HSET', key, 'last_body_hash', mine.last_body_hash,
      'body_repeats', mine.body_repeats or '1')
  end
  if num(key, 'rate_slow') == 0 and mine.rate_slow ~= nil then
    redis.call('HSET', key, 'rate_slow', mine.rate_slow)
  end
  if mine.rate_fast ~= nil and tonumber(mine.rate_fast) ~= 0 then
    redis.call('HSET', key, 'rate_fast', mine.rate_fast)
  end
  changed(key, redis.call('HGET', key, 'id'))
  return {'ok'}
end

if op == 'begin' then
  return begin()
elseif op == 'settle' then
  return settle()
elseif op == 'aux' or op == 'note' or op == 'compaction' then
  return record()
elseif op == 'grant' then
  return grant()
elseif op == 'status' then
  return set_status()
elseif op == 'merge' then
  return merge()
elseif op == 'reclaim' then
  reclaim()
  return {'ok'}
elseif op == 'renew' then
  -- ARGV 6 lease length (seconds), 7.. this replica's leases of calls in flight.
  local deadline = fmt(server_time() + tonumber(ARGV[6]))
  for i = 7, #ARGV do
    redis.call('ZADD', KEYS[4], 'XX', deadline, ARGV[i])
  end
  return {'ok'}
end
return redis.error_reply('gateway store: unknown op ' .. tostring(op))
