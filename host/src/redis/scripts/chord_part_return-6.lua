-- Chord part return: Celery 5.7's CHORD_PART_RETURN_LUA (celery/backends/redis.py), verbatim
-- below this header, so Python workers and taskhost workers count the same chord together.
-- Records one header task's outcome once (keyed by task id and header index), refreshes the
-- expiries, and when every part is in claims the right to call the body, in the same step.
--
-- Input:
--   KEYS[1..6]  celery-taskset-meta-<gid>.j .t .s .d, celery-taskset-meta-<gid>, and .c
--   ARGV[1]  the task id          ARGV[2]  the encoded part `[1, id, state, result]`
--   ARGV[3]  '1': .j is a sorted set (Celery's default)   ARGV[4]  the score (group_index)
--   ARGV[5]  seconds to keep the chord keys   ARGV[6]  seconds to keep the group key
--   ARGV[7]  seconds the claim lasts          ARGV[8]  this caller's claim token
-- Output: {ready count, .t, .s, 1 if this caller claimed the body}; {-1, 0, 0, 0} once the
-- chord is done.
local jkey, tkey, skey, dkey, gkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tid, value, ordered, score = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expires, group_expires = tonumber(ARGV[5]), tonumber(ARGV[6])
local claim_expires = tonumber(ARGV[7])
local claim_token = ARGV[8]

-- Prevent late duplicates from recreating chord state after successful cleanup.
local done_marker = redis.call('GET', ckey)
if done_marker == 'done' then
    return {-1, 0, 0, 0}
end

-- Key the check on the task id and header index, so it doesn't merge two
-- header entries that share the task id of a reused frozen signature.
local member = tid .. ':' .. score
if redis.call('SISMEMBER', dkey, member) == 0 then
    if ordered == '1' then
        redis.call('ZADD', jkey, score, value)
    else
        redis.call('RPUSH', jkey, value)
    end
    redis.call('SADD', dkey, member)
end
local readycount
if ordered == '1' then
    readycount = redis.call('ZCOUNT', jkey, '-inf', '+inf')
else
    readycount = redis.call('LLEN', jkey)
end
if expires > 0 then
    for _, key in ipairs({jkey, tkey, skey, dkey}) do
        redis.call('EXPIRE', key, expires)
    end
    if group_expires > 0 then
        redis.call('EXPIRE', gkey, group_expires)
    end
end

local totaldiff = redis.call('GET', tkey)
local size = redis.call('GET', skey)
local claimed = 0
if size and readycount == tonumber(size) + tonumber(totaldiff or 0) then
    if redis.call('SET', ckey, claim_token, 'NX', 'EX', claim_expires) then
        claimed = 1
    end
end

return {readycount, totaldiff, size, claimed}
