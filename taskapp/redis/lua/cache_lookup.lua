-- One round trip of the response cache (after gcra.lua):
--   KEYS: the epoch, the view's generation, a rate-limit bucket (or ''), then pairs of a
--         loaded entry waiting to be stored and its fill lock;
--   ARGV: the view's key prefix, the entry's key, a fill-lock token, the lock's TTL (ms),
--         '1' to count the request against the bucket first, the bucket's interval and
--         burst, the entries' TTL (s), then pairs of a stored value and its lock token.
-- Stores the waiting entries (releasing their locks if still theirs); counts the request
-- (a refused one looks nothing up); then looks the entry up under the current epoch and
-- generation. On a miss, also takes the entry's fill lock ('locked': ours, load it; 'busy':
-- someone else's) and returns when the view was last written.
-- Returns {entry key, value, lock, rate-limit decision, last write}.
for i = 1, (#KEYS - 3) / 2 do
  redis.call('SET', KEYS[2 + 2 * i], ARGV[7 + 2 * i], 'EX', ARGV[8])
  if redis.call('GET', KEYS[3 + 2 * i]) == ARGV[8 + 2 * i] then
    redis.call('DEL', KEYS[3 + 2 * i])
  end
end
local decision = false
if ARGV[5] == '1' then
  decision = gcra(KEYS[3], tonumber(ARGV[6]), tonumber(ARGV[7]))
  if decision[1] == 0 then return {false, false, false, decision, false} end
end
local epoch = redis.call('GET', KEYS[1]) or '0'
local generation = redis.call('GET', KEYS[2]) or '0'
local key = ARGV[1] .. epoch .. ':' .. generation .. ':' .. ARGV[2]
local value = redis.call('GET', key)
if value then return {key, value, false, decision, false} end
local wrote = redis.call('GET', KEYS[2] .. ':wrote') or '0'
local cleared = redis.call('GET', KEYS[1] .. ':wrote') or '0'
if tonumber(cleared) > tonumber(wrote) then wrote = cleared end
if redis.call('SET', key .. ':lock', ARGV[3], 'NX', 'PX', ARGV[4]) then
  return {key, false, 'locked', decision, wrote}
end
return {key, false, 'busy', decision, wrote}
