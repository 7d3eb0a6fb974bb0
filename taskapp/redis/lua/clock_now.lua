-- A reading of the clock KEYS[1] (after clock.lua).
return tick(KEYS[1])
