-- Bump the counters in KEYS[2..] (generations, or the epoch) and record the reading of the
-- clock KEYS[1] beside each (after clock.lua). No TTL: evicted, a write time would read as
-- "long ago".
local now = tick(KEYS[1])
for i = 2, #KEYS do
  redis.call('INCR', KEYS[i])
  redis.call('SET', KEYS[i] .. ':wrote', now)
end
