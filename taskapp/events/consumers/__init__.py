"""The consumers of events, one module each."""
