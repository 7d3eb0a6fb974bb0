"""Rate limits in Redis (GCRA), shared by every process and instance: per caller, and per
client address for requests without a valid token."""
