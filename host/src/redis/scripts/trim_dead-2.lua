-- Trim dead: keeps the newest entries of the dead-letter list, at most the cap, and counts the
-- oldest it drops, so the list cannot grow without bound and what was dropped is known.
--
-- Input:
--   KEYS[1]  the dead-letter list (newest first)
--   KEYS[2]  the dropped-entries counter
--   ARGV[1]  the most entries kept
-- Output: how many entries were dropped now.
local n = redis.call('LLEN', KEYS[1])
local max = tonumber(ARGV[1])
if n <= max then return 0 end
redis.call('LTRIM', KEYS[1], 0, max - 1)
redis.call('INCRBY', KEYS[2], n - max)
return n - max
