"""Metrics (multiprocess-safe), logging, and the database's instrumentation and probe."""
