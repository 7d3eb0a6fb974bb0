"""Reliability runs: faults (chaos), hostile input (fuzz) and sustained load (soak)."""
