"""E-mail notifications: a transactional outbox relayed through Celery to SMTP."""
