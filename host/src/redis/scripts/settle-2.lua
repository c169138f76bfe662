-- Settle: removes a message from its in-flight list and, in the same step, sends it on (to
-- its queue, the delayed set or the dead-letter list) — only if it was still in flight. So a
-- retry after a lost reply (a killed connection) never moves a message twice, and a message
-- another worker already returned is left alone.
--
-- Input:
--   KEYS[1]  the in-flight list holding the message
--   KEYS[2]  where it goes
--   ARGV[1]  the message as fetched
--   ARGV[2]  how it goes: 'lpush' (where producers push), 'rpush' (taken next), or 'zadd'
--   ARGV[3]  what is written there (the message, a retry of it, or a dead-letter entry)
--   ARGV[4]  the score, for 'zadd'
-- Output: 1 if it moved; 0 if it was no longer in flight (nothing was written).
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if ARGV[2] == 'lpush' then redis.call('LPUSH', KEYS[2], ARGV[3])
elseif ARGV[2] == 'rpush' then redis.call('RPUSH', KEYS[2], ARGV[3])
elseif ARGV[2] == 'zadd' then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3]) end
return 1
