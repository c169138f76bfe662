-- In flight anywhere: which of the given task ids some registered worker has taken (its
-- message is in one of the worker's in-flight lists). A revoke heard by every worker stores
-- REVOKED only for a task nobody holds; the worker holding it settles it itself. Each
-- in-flight message is read once, whatever the number of ids: the work grows with the ids
-- plus the messages in flight, not with their product.
--
-- Input:
--   KEYS[1]  the worker registry (`taskhost:workers`): node name → entry with its `sources`
--   ARGV[1]  what every in-flight list's name starts with (`taskhost:inflight:`); the node,
--            ':' and the source complete it
--   ARGV[2..] the task ids
-- Output: the ids among ARGV[2..] held in flight. A message whose headers carry no id (an
-- older protocol) is searched for each id as plain text; a false match only defers the
-- REVOKED to the worker that meets the message.
local held, unread = {}, {}
local registry = redis.call('HGETALL', KEYS[1])
for i = 1, #registry, 2 do
  local ok, w = pcall(cjson.decode, registry[i + 1])
  if ok and type(w) == 'table' and type(w.sources) == 'table' then
    for _, source in ipairs(w.sources) do
      local list = ARGV[1] .. registry[i] .. ':' .. source
      for _, m in ipairs(redis.call('LRANGE', list, 0, -1)) do
        local decoded, env = pcall(cjson.decode, m)
        local id = nil
        if decoded and type(env) == 'table' and type(env.headers) == 'table' then
          id = env.headers.id
        end
        if type(id) == 'string' then held[id] = true else unread[#unread + 1] = m end
      end
    end
  end
end
local found = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local hit = held[id]
  if not hit then
    for _, m in ipairs(unread) do
      if string.find(m, id, 1, true) then hit = true; break end
    end
  end
  if hit then found[#found + 1] = id end
end
return found
