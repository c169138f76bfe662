-- Store result: stores a task's state and publishes it in one step. A stored SUCCESS is never
-- overwritten (as Celery's `_store_result` guards), so a task run twice cannot turn a success
-- into a failure; with ARGV[3] = 'ready', no ready state (SUCCESS, FAILURE, REVOKED) is
-- overwritten, so a late progress update or a revoke never replaces a task's outcome.
--
-- Input:
--   KEYS[1]  the result key (`celery-task-meta-<id>`), also the channel waiters listen on
--   ARGV[1]  the result document
--   ARGV[2]  seconds to keep it (0: forever)
--   ARGV[3]  what it keeps: 'success' (a stored SUCCESS) or 'ready' (any ready state)
-- Output: 1 if stored; 0 if a state it keeps was there (and is kept).
local current = redis.call('GET', KEYS[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  if ok and type(doc) == 'table' then
    local status = doc['status']
    if status == 'SUCCESS' then return 0 end
    if ARGV[3] == 'ready' and (status == 'FAILURE' or status == 'REVOKED') then return 0 end
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
