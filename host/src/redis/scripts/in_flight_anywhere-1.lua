-- In flight anywhere: whether any registered worker has taken a task (its message is in one
-- of the worker's in-flight lists). A revoke heard by every worker stores REVOKED only for a
-- task nobody holds; the worker holding it settles it itself.
--
-- Input:
--   KEYS[1]  the worker registry (`taskhost:workers`): node name → entry with its `sources`
--   ARGV[1]  what every in-flight list's name starts with (`taskhost:inflight:`); the node,
--            ':' and the source complete it
--   ARGV[2]  the task id, looked for as plain text in each message (a false match only defers
--            the REVOKED to the worker that meets the message)
-- Output: 1 if some in-flight message holds the id, else 0.
local registry = redis.call('HGETALL', KEYS[1])
for i = 1, #registry, 2 do
  local ok, w = pcall(cjson.decode, registry[i + 1])
  if ok and type(w) == 'table' and type(w.sources) == 'table' then
    for _, source in ipairs(w.sources) do
      local list = ARGV[1] .. registry[i] .. ':' .. source
      for _, m in ipairs(redis.call('LRANGE', list, 0, -1)) do
        if string.find(m, ARGV[2], 1, true) then return 1 end
      end
    end
  end
end
return 0
