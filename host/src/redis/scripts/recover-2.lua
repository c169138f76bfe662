-- Recover: returns a lapsed worker's in-flight messages to the lists they came from (or, past
-- the redelivery limit, to the dead-letter list) and removes its registry entry — only if its
-- heartbeat is still lapsed when the script runs, so it happens once whichever workers notice.
-- The lapse is measured on Redis's clock, the one heartbeats are written with, so workers whose
-- clocks disagree never take each other for dead.
--
-- Input:
--   KEYS[1]  the worker registry (`taskhost:workers`)
--   KEYS[2]  the dead-letter list
--   ARGV[1]  the lapsed worker's node name
--   ARGV[2]  the lapse, ms: a heartbeat younger than this is alive
--   ARGV[3]  the worker's in-flight prefix (`taskhost:inflight:<node>:`)
--   ARGV[4]  returns after which a message is dead-lettered
--   ARGV[5]  seconds a redelivery count is remembered
--   ARGV[6]  now, as the dead-letter entry's time
--   ARGV[7]  the redelivery counter prefix (`taskhost:redelivered:`), completed by the tag
-- Output: {returned, {each dead-lettered message}}, or {-1, {}} if the worker is alive.
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return {0, {}} end
local ok, w = pcall(cjson.decode, entry)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ok and type(w) == 'table' and now - (tonumber(w.hb) or 0) < tonumber(ARGV[2]) then
  return {-1, {}}
end
local sources = {}
if ok and type(w) == 'table' and type(w.sources) == 'table' then sources = w.sources end
local returned, dead = 0, {}
for _, source in ipairs(sources) do
  local inflight = ARGV[3] .. source
  while true do
    -- Newest first, each to the consuming end: the oldest is served first again.
    local m = redis.call('LPOP', inflight)
    if not m then break end
    local tag, id, task = nil, nil, nil
    local decoded, env = pcall(cjson.decode, m)
    if decoded and type(env) == 'table' then
      if type(env.properties) == 'table' then tag = env.properties.delivery_tag end
      if type(env.headers) == 'table' then id = env.headers.id; task = env.headers.task end
    end
    local n = 1
    if type(tag) == 'string' then
      local key = ARGV[7] .. tag
      n = redis.call('INCR', key)
      redis.call('EXPIRE', key, ARGV[5])
    end
    if n > tonumber(ARGV[4]) then
      redis.call('LPUSH', KEYS[2], cjson.encode({
        reason = 'returned from ' .. (n - 1) .. ' workers that died running it: it may be what kills them',
        task_id = id, task = task, queue = source, worker = ARGV[1], time = ARGV[6], message = m}))
      dead[#dead + 1] = m
    else
      redis.call('RPUSH', source, m)
      returned = returned + 1
    end
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
return {returned, dead}
