"""What tests, the benchmark and the reliability runs share: real servers (PostgreSQL, Redis,
PgBouncer, a streaming standby, SMTP), an OpenID Connect provider and its tokens, and
`taskapp` processes."""
