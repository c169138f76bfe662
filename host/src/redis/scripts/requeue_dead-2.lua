-- Requeue dead: removes exactly one dead-letter entry and pushes its message onto its queue in
-- one step, so a message is never in both places, nor in neither.
--
-- Input:
--   KEYS[1]  the dead-letter list
--   KEYS[2]  the queue list the message goes back to
--   ARGV[1]  the entry, as read
--   ARGV[2]  the message it holds
-- Output: 1 if moved; 0 if the entry was no longer there.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
