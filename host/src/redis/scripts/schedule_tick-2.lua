-- Schedule tick: sends a periodic task's tick once across every worker's scheduler, with no
-- leader. The claim (the entry's last tick moving forward) and the message are one step, so
-- a tick is never claimed without being sent, nor sent twice; a tick at or before the last
-- one sent is refused, whichever worker's clock computed it.
--
-- Input:
--   KEYS[1]  the hash of last ticks sent, by entry name
--   KEYS[2]  the queue list the task goes to
--   ARGV[1]  the entry name   ARGV[2]  the tick (ms since the epoch)   ARGV[3]  the message
-- Output: 1 if this call sent the tick; 0 if it, or a later one, was sent before.
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if last and last >= tonumber(ARGV[2]) then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
