"""Request ids, logging and health endpoints."""
