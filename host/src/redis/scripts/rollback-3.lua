-- Rollback: makes the previous deployed version of a plugin current again, unsigned (the
-- operator's rollback signs it anew, or fleet workers with trusted keys refuse it).
--
-- Input:
--   KEYS[1]  the plugin's deploy history (newest first)
--   KEYS[2]  the deployed-versions hash
--   KEYS[3]  the signed deploy records hash
--   ARGV[1]  the plugin name
-- Output: {from, to} digests, or {} when there is no earlier version.
local h = redis.call('LRANGE', KEYS[1], 0, 1)
if #h < 2 then return {} end
redis.call('LPOP', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[1], h[2])
redis.call('HDEL', KEYS[3], ARGV[1])
return h
