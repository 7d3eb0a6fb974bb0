-- GCRA: a bucket is the "theoretical arrival time" (TAT) of the next request, in ms of the
-- Redis server clock (one clock for every instance). `burst` requests may arrive at once;
-- after that one every `interval` ms. Returns allowed, remaining, retry-after ms, reset ms.
local function gcra(key, interval, burst)
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  local window = interval * burst
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - window
  if allow_at > now then
    return {0, 0, allow_at - now, tat - now}
  end
  -- max(1, ...): at rates beyond a few million per second the interval vanishes in the
  -- float precision of a ms timestamp; the bucket then never fills, which is right.
  redis.call('SET', key, new_tat, 'PX', math.max(1, math.ceil(new_tat - now)))
  return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
end
