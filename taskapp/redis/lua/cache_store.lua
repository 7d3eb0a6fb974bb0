-- Store loaded entries that no lookup came by to carry: KEYS are pairs of an entry and its
-- fill lock; ARGV the TTL (s), then pairs of a value and its lock token. A lock is released
-- only if it is still the loader's.
for i = 1, #KEYS / 2 do
  redis.call('SET', KEYS[2 * i - 1], ARGV[2 * i], 'EX', ARGV[1])
  if redis.call('GET', KEYS[2 * i]) == ARGV[2 * i + 1] then redis.call('DEL', KEYS[2 * i]) end
end
