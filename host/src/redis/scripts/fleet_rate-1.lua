-- Fleet rate: one start of a task under a rate limit shared by every worker (GCRA with no
-- burst: starts at least one interval apart), on Redis's clock so workers' clocks never
-- disagree. A start is taken only when allowed: a refused caller takes nothing.
--
-- Input:
--   KEYS[1]  the task's rate key (when the next start is allowed, microseconds)
--   ARGV[1]  the interval between starts, microseconds
-- Output: 0 if this start is taken; else the microseconds until the next is allowed.
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local interval = tonumber(ARGV[1])
local allowed = tonumber(redis.call('GET', KEYS[1]) or '0')
if allowed > now_us then
  return allowed - now_us
end
local next_us = math.max(allowed, now_us) + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_us), 'PX', math.ceil(interval / 1000) + 1000)
return 0
