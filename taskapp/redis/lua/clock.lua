-- The cache's clock (a key): the Redis server's time in µs, but never less than one past the
-- last reading, so it only moves forward, even if the server's clock is set back.
local function tick(clock)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(redis.call('GET', clock) or '0')
  if now <= last then now = last + 1 end
  now = string.format('%.0f', now)
  redis.call('SET', clock, now)
  return now
end
