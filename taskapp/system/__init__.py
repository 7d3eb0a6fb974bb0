"""The service's own endpoints: health, readiness, metrics."""
