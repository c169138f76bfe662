-- Chord cleanup: Celery 5.7's CHORD_CLEANUP_LUA (celery/backends/redis.py), verbatim below
-- this header. Once the body is published, deletes the chord's data and leaves a `done`
-- marker, so a late duplicate of a header task cannot call the body again.
--
-- Input:
--   KEYS[1..5]  celery-taskset-meta-<gid>.c .j .t .s .d
--   ARGV[1]  the claim token   ARGV[2]  seconds the done marker lasts
-- Output: 1 if this caller still held the claim (and cleaned up); 0 otherwise.
local ckey = KEYS[1]
local jkey = KEYS[2]
local tkey = KEYS[3]
local skey = KEYS[4]
local dkey = KEYS[5]
local token = ARGV[1]
local done_expires = tonumber(ARGV[2])

if redis.call('GET', ckey) == token then
    redis.call('DEL', jkey, tkey, skey, dkey)
    if done_expires and done_expires > 0 then
        redis.call('SET', ckey, 'done', 'EX', done_expires)
    end
    return 1
end
return 0
