-- Schedule tick: sends a periodic task's tick once across every worker's scheduler, with no
-- leader. The claim (the entry's last tick moving forward) and the message are one step, so
-- a tick is never claimed without being sent, nor sent twice; a tick at or before the last
-- one sent is refused, whichever worker's clock computed it. A tick later than Redis's clock
-- by more than the bound (a worker whose clock runs fast) is refused and not stored, and a
-- stored last tick beyond the bound (left by such a worker before) counts as none, so one
-- wrong clock cannot silence the schedule for the others.
--
-- Input:
--   KEYS[1]  the hash of last ticks sent, by entry name
--   KEYS[2]  the queue list the task goes to
--   ARGV[1]  the entry name   ARGV[2]  the tick (ms since the epoch)   ARGV[3]  the message
--   ARGV[4]  the bound, ms: how far ahead of Redis's clock a tick may be
-- Output: {1, now} if this call sent the tick; {0, now} if it, or a later one, was sent
-- before; {-1, now} if the tick is beyond the bound. `now` is Redis's clock, ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bound = now + tonumber(ARGV[4])
local tick = tonumber(ARGV[2])
if tick > bound then return {-1, now} end
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if last and last > bound then last = nil end
if last and last >= tick then return {0, now} end
redis.call('LPUSH', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {1, now}
