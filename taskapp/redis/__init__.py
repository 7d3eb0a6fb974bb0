"""Redis: the shared client and its breaker, the response cache, and the Lua scripts."""
