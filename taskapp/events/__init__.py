"""Domain events: an outbox written with each change, a relay to the Celery broker, and the
consumers that act on them (e-mail now)."""
