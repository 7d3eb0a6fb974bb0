-- Give the fill lock KEYS[1] up, if it is still ours (ARGV[1], our token).
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
