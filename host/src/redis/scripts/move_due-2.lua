-- Move due: moves delayed messages whose time has come onto the consuming end of their queue
-- lists (RPUSH: taken next, as they are already late). Any worker may run it; a member moves
-- once, whoever runs it.
--
-- Input:
--   KEYS[1]  the delayed set (`taskhost:delayed`): members `<queue key>\n<message>`, scored by
--            when they are due (ms since the epoch)
--   KEYS[2]  the dead-letter list, for a member without a queue key
--   ARGV[1]  now, ms since the epoch
--   ARGV[2]  the most members to move in one call
-- Output: {moved, next}: how many moved, and the score of the next member ('-1' if none).
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local sep = string.find(member, '\n', 1, true)
  if sep then
    redis.call('RPUSH', string.sub(member, 1, sep - 1), string.sub(member, sep + 1))
  else
    redis.call('LPUSH', KEYS[2], cjson.encode({reason = 'malformed delayed entry', message = member}))
  end
  redis.call('ZREM', KEYS[1], member)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, nxt[2] or '-1'}
