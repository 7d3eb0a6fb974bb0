"""`make bench`: the load benchmark, against an independent ceiling (docs/performance.md)."""
