-- Store results: stores each task's state and publishes it, in one step per key. A final
-- state is never overwritten: a stored SUCCESS (as Celery's `_store_result` guards, so a
-- task run twice cannot turn a success into a failure) and a stored REVOKED (which a waiter
-- may already have raised on: a task a revoke reached while it was on its way to a worker
-- ends REVOKED, whatever its run returns). With ARGV[2] = 'ready', no ready state (SUCCESS,
-- FAILURE, REVOKED) is overwritten, so a late progress update or a revoke never replaces a
-- task's outcome.
--
-- Input:
--   KEYS[1..n]  the result keys (`celery-task-meta-<id>`), also the channels waiters listen on
--   ARGV[1]     seconds to keep each (0: forever)
--   ARGV[2]     what it keeps: 'final' (a stored SUCCESS or REVOKED) or 'ready' (any ready
--               state)
--   ARGV[3..n+2] the documents, in the order of KEYS
-- Output: for each key, 1 if stored; 0 if a SUCCESS was there, 2 if another state it keeps
-- (and either is kept).
local kept = {SUCCESS = true, REVOKED = true}
if ARGV[2] == 'ready' then kept.FAILURE = true end
local expires = tonumber(ARGV[1])
local stored = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  local keep = nil
  if current then
    local ok, doc = pcall(cjson.decode, current)
    if ok and type(doc) == 'table' and kept[doc['status']] then keep = doc['status'] end
  end
  if keep == 'SUCCESS' then
    stored[i] = 0
  elseif keep then
    stored[i] = 2
  else
    local document = ARGV[i + 2]
    if expires > 0 then
      redis.call('SET', key, document, 'EX', expires)
    else
      redis.call('SET', key, document)
    end
    redis.call('PUBLISH', key, document)
    stored[i] = 1
  end
end
return stored
