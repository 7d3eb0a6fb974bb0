"""PostgreSQL: engines, the connections requests use, units of work, the read replica."""
