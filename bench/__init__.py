"""The load benchmark: `make bench` (see README, "Performance")."""
