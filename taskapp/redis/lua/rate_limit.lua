-- Count one request against the bucket KEYS[1]: ARGV interval (ms) and burst (after gcra.lua).
return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
