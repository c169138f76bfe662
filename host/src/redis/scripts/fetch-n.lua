-- Fetch: takes up to ARGV[1] messages from the queue lists, in the order given, into this
-- worker's in-flight lists, without waiting. Each message moves atomically: it is in its queue
-- or in an in-flight list, never only in the reply.
--
-- Input:
--   KEYS[1..n]  the queue lists, in kombu's order (priority-major, queue-minor)
--   ARGV[1]     the most messages to take
--   ARGV[2]     the in-flight prefix (`taskhost:inflight:<node>:`); a message from list K goes
--               to ARGV[2] .. K
-- Output: a flat list {key, message, key, message, ...}: each message and the list it came from.
local out = {}
local max = tonumber(ARGV[1]) * 2
for i = 1, #KEYS do
  while #out < max do
    local m = redis.call('RPOP', KEYS[i])
    if not m then break end
    redis.call('LPUSH', ARGV[2] .. KEYS[i], m)
    out[#out + 1] = KEYS[i]
    out[#out + 1] = m
  end
  if #out >= max then break end
end
return out
