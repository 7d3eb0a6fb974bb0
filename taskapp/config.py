"""Settings: one object, read from `TASKAPP_*` environment variables (and `.env`).

Each concern is a group with its own prefix, so the external names stay flat and stable
(`TASKAPP_DATABASE_URL`, `TASKAPP_OIDC_ISSUER`, ...) while the code reads
`settings.database.url`, `settings.oidc.issuer`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, NamedTuple, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PLACEHOLDER_SECRETS = frozenset({"changethis", "changeme", "secret", "password"})


class Environment(StrEnum):
    DEV = "dev"
    TEST = "test"
    PRODUCTION = "production"


def _group(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=prefix, env_file=".env", extra="ignore", validate_default=True
    )


class EnvironmentSettings(BaseSettings):
    """`TASKAPP_ENV` alone, for decisions that come before the rest is validated."""

    model_config = _group("TASKAPP_")

    env: Environment = Environment.DEV


# Upper bound of TASKAPP_DATABASE_REPLICA_MAX_LAG, in seconds.
REPLICA_LAG_BOUND = 300


class DatabaseSettings(BaseSettings):
    """`TASKAPP_DATABASE_*`: the PostgreSQL connection and its pool."""

    model_config = _group("TASKAPP_DATABASE_")

    url: SecretStr | None = None
    # The requests' pool of each process opens up to pool_size + max_overflow connections as
    # load needs them (asyncpg's pool, taskapp.database.driver). SQLAlchemy's engine beside it
    # (the probe, maintenance) keeps pool_size and closes an overflow connection as soon as it
    # is given back; in the API it uses one connection, for the probe.
    pool_size: Annotated[int, Field(ge=1, le=500)] = 20
    max_overflow: Annotated[int, Field(ge=0, le=500)] = 0
    # Seconds a request waits for a free connection before it gets a 503.
    pool_timeout: Annotated[float, Field(gt=0, le=120)] = 5.0
    # Requests' pool: seconds a connection may stay idle before it is closed; SQLAlchemy's
    # engine: age after which a connection is replaced. -1: never.
    pool_recycle: Annotated[int, Field(ge=-1)] = 1800
    connect_timeout: Annotated[float, Field(gt=0, le=120)] = 5.0
    # Server-side statement timeout in seconds; 0 disables it.
    statement_timeout: Annotated[float, Field(ge=0, le=3600)] = 15.0
    # Client-side bound on any one command, so a server that stops answering (rather than
    # refusing connections) cannot hang requests; keep it above statement_timeout.
    command_timeout: Annotated[float, Field(gt=0, le=3600)] = 20.0
    echo: bool = False
    # A streaming standby of the same database for list and read queries; reads of a view
    # written more recently than the standby has replayed still go to the primary, and so
    # does everything while the standby is down or lags (see docs/scaling.md).
    replica_url: SecretStr | None = None
    # Seconds behind the primary past which the standby serves no reads at all.
    replica_max_lag: Annotated[float, Field(gt=0, le=REPLICA_LAG_BOUND)] = 10.0
    # How often each process measures how far the standby has replayed.
    replica_check_interval: Annotated[float, Field(gt=0, le=60)] = 1.0
    # The URLs point at PgBouncer in transaction pooling mode: no protocol-level named
    # prepared statements (each statement is prepared unnamed, inside a transaction that
    # pins one server connection) and no settings in the startup packet, which PgBouncer
    # refuses; set statement_timeout on the role instead (docs/scaling.md).
    pgbouncer: bool = False

    @field_validator("url", "replica_url")
    @classmethod
    def _async_driver(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        url = value.get_secret_value()
        # Accept the URL forms people paste (postgres://, postgresql://) and pin asyncpg.
        url = re.sub(r"^(postgres|postgresql)(\+\w+)?://", "postgresql+asyncpg://", url)
        if not url.startswith("postgresql+asyncpg://"):
            raise ValueError("must be a PostgreSQL URL (postgresql://user:pass@host:5432/db)")
        return SecretStr(url)


class RedisSettings(BaseSettings):
    """`TASKAPP_REDIS_*`: the Redis server."""

    model_config = _group("TASKAPP_REDIS_")

    url: SecretStr | None = None
    # Redis is on the hot path (cache, rate limit): never let it stall a request.
    socket_timeout: Annotated[float, Field(gt=0, le=30)] = 0.5
    # Prefix of every key taskapp writes, so several deployments can share one Redis.
    key_prefix: Annotated[str, Field(min_length=1, max_length=64)] = "taskapp:"

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.match(r"^(redis|rediss|unix)://", value.get_secret_value()):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value


class OIDCSettings(BaseSettings):
    """`TASKAPP_OIDC_*`: the OpenID Connect provider whose access tokens the API accepts."""

    model_config = _group("TASKAPP_OIDC_")

    # Keycloak: http://host:8080/realms/NAME. Unset only in the dev mode of `taskapp run`.
    issuer: str | None = None
    # Where to fetch the discovery document when the issuer's public URL is not reachable
    # from the API (a container network: http://keycloak:8080/realms/NAME/.well-known/
    # openid-configuration). The document must still name `issuer`, and tokens must carry
    # it. Unset: {issuer}/.well-known/openid-configuration.
    discovery_url: str | None = None
    audience: str = "taskapp-api"
    # Trust the local dev signing key in the data directory (set by `taskapp run` only).
    trust_dev_key: bool = False
    jwks_cache_ttl: Annotated[float, Field(gt=0)] = 300.0
    # Least time between two JWKS fetches triggered by unknown key ids.
    jwks_refetch_cooldown: Annotated[float, Field(ge=0)] = 10.0
    http_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
    leeway: Annotated[int, Field(ge=0, le=300)] = 30
    # Verified tokens remembered per process (skips the RSA check on repeat use); 0: off.
    claims_cache_size: Annotated[int, Field(ge=0)] = 10_000
    # Longest a remembered token is accepted without a new signature check (never past its
    # exp, and never once its key has left the JWKS).
    claims_cache_ttl: Annotated[float, Field(gt=0)] = 300.0
    # Public client id (PKCE) that Swagger UI at /docs uses to log in; unset hides that flow.
    swagger_client_id: str | None = None
    # Accept a token whose `azp` (the client it was issued to) is the audience, though its
    # `aud` does not name it. Off: `aud` must name the audience, as RFC 9068 requires.
    accept_azp_audience: bool = False
    # Mail the `email` claim even when `email_verified` is not true. Off: only verified
    # addresses get mail; the others are skipped, as a missing address is.
    accept_unverified_email: bool = False

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http(s) URL such as http://keycloak:8080/realms/taskapp")
        # Tokens carry the issuer exactly as configured in the provider: no trailing slash.
        return value.rstrip("/")

    @field_validator("discovery_url")
    @classmethod
    def _discovery_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(
                "must be an http(s) URL such as "
                "http://keycloak:8080/realms/taskapp/.well-known/openid-configuration"
            )
        return value

    @model_validator(mode="after")
    def _discovery_needs_issuer(self) -> Self:
        if self.discovery_url is not None and self.issuer is None:
            raise ValueError(
                "TASKAPP_OIDC_DISCOVERY_URL needs TASKAPP_OIDC_ISSUER (the issuer tokens carry)"
            )
        return self


class CacheSettings(BaseSettings):
    """`TASKAPP_CACHE_*`: the Redis response cache of GET /tasks and GET /tasks/{id}."""

    model_config = _group("TASKAPP_CACHE_")

    enabled: bool = True
    ttl: Annotated[int, Field(ge=1, le=86_400)] = 60
    # Longest a cache operation may take before the request goes to the database instead.
    timeout: Annotated[float, Field(gt=0, le=5)] = 0.2
    # After a Redis failure, requests bypass the cache for this long before trying again.
    retry_interval: Annotated[float, Field(gt=0, le=60)] = 1.0
    # How long one loader holds the fill lock of a key, and how long others wait for it.
    lock_ttl: Annotated[float, Field(gt=0, le=30)] = 2.0
    lock_wait: Annotated[float, Field(ge=0, le=10)] = 0.5


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(s|sec|second|m|min|minute|h|hour|d|day)s?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Rate(NamedTuple):
    """`requests` per `period` seconds."""

    requests: int
    period: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        match = _RATE.match(text.lower())
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"{text!r} is not a rate such as 100/minute, 10/second or 500/5m")
        period = int(match.group(2) or 1) * _UNIT_SECONDS[match.group(3)[0]]
        if period < 1:
            raise ValueError(f"{text!r} has an empty period")
        return cls(int(match.group(1)), period)

    def __str__(self) -> str:
        return f"{self.requests}/{self.period}s"


class RateLimitSettings(BaseSettings):
    """Rate limits: `TASKAPP_RATE_LIMIT` per user, `TASKAPP_RATE_LIMIT_*` for the rest."""

    model_config = _group("TASKAPP_RATE_LIMIT_") | {"populate_by_name": True}

    enabled: bool = True
    # Per authenticated subject.
    per_user: Annotated[Rate, NoDecode, Field(validation_alias="TASKAPP_RATE_LIMIT")] = Rate(
        100, 60
    )
    # Per client IP, for requests without a valid token (including failed authentication).
    anonymous: Annotated[Rate, NoDecode] = Rate(20, 60)
    # When Redis is unreachable: let requests through (False) or answer 503 (True).
    fail_closed: bool = False
    # Longest a limit check may take before Redis counts as unreachable, and how long
    # checks are then skipped (failing open or closed) before Redis is tried again.
    timeout: Annotated[float, Field(gt=0, le=5)] = 0.2
    retry_interval: Annotated[float, Field(gt=0, le=60)] = 1.0
    # Peers whose X-Forwarded-For is believed, e.g. "127.0.0.1,10.0.0.0/8" (a reverse proxy).
    trusted_proxies: Annotated[str, Field(validation_alias="TASKAPP_TRUSTED_PROXIES")] = ""

    @field_validator("per_user", "anonymous", mode="before")
    @classmethod
    def _rate(cls, value: object) -> object:
        return Rate.parse(value) if isinstance(value, str) else value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(f"{part!r} is not an IP address or network") from None
        return value

    @property
    def trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        parts = (p.strip() for p in self.trusted_proxies.split(","))
        return [ipaddress.ip_network(p, strict=False) for p in parts if p]


class SMTPSettings(BaseSettings):
    """`TASKAPP_SMTP_*`: the mail server that notifications go through."""

    model_config = _group("TASKAPP_SMTP_")

    # smtp://[user:password@]host[:port] (STARTTLS when TASKAPP_SMTP_STARTTLS is set) or
    # smtps://... (TLS from the first byte). Unset: notifications stay pending.
    url: SecretStr | None = None
    starttls: bool = False
    username: str | None = None
    password: SecretStr | None = None
    from_address: str = "taskapp <noreply@taskapp.localhost>"
    timeout: Annotated[float, Field(gt=0, le=120)] = 10.0

    @field_validator("url")
    @classmethod
    def _smtp_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.match(r"^smtps?://[^/]+", value.get_secret_value()):
            raise ValueError("must be an smtp:// or smtps:// URL such as smtp://mail:25")
        return value


class NotificationSettings(BaseSettings):
    """`TASKAPP_NOTIFICATIONS_*`: delivery of the e-mail sent when a task is created."""

    model_config = _group("TASKAPP_NOTIFICATIONS_")

    # Off: no e-mail is recorded or sent when tasks are created.
    enabled: bool = True
    # The broker queue of the jobs, so deployments can share one broker.
    queue: Annotated[str, Field(min_length=1, max_length=100)] = "taskapp"
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 8
    # Retry n waits about backoff * 2**(n-1) seconds (capped, with jitter).
    backoff: Annotated[float, Field(gt=0, le=3600)] = 5.0
    backoff_max: Annotated[float, Field(gt=0, le=86_400)] = 600.0
    # The sweep re-enqueues rows still pending this long after they were due.
    grace: Annotated[float, Field(ge=0, le=86_400)] = 30.0
    sweep_interval: Annotated[float, Field(gt=0, le=3600)] = 15.0
    # Where a mail's link to a task points: `<link_base>/tasks/<id>` (the API's address
    # as its users reach it, or the web UI's).
    link_base: Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2000)] = (
        "http://localhost:8000"
    )


class WorkerSettings(BaseSettings):
    """`TASKAPP_WORKER_*`: the Celery processes, `taskapp worker` and `taskapp beat`."""

    model_config = _group("TASKAPP_WORKER_")

    # Serve the process's own Prometheus metrics at http://HOST:PORT/metrics (with the
    # bearer token TASKAPP_METRICS_TOKEN when it is set), for a scraper in another container
    # or pod. Unset: no listener (`taskapp run` keeps it unset: its API's /metrics already
    # reports the worker's metrics).
    metrics_port: Annotated[int | None, Field(ge=1, le=65535)] = None
    # Every interface: the scraper reaches the container or pod at its own address.
    metrics_host: Annotated[str, Field(min_length=1)] = "0.0.0.0"  # noqa: S104  # nosec B104

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _unset_port(cls, value: object) -> object:
        # TASKAPP_WORKER_METRICS_PORT= (empty) turns the listener off, as unset does.
        return None if isinstance(value, str) and not value.strip() else value


_ORIGIN = re.compile(
    r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$"
)


class Settings(BaseSettings):
    """All configuration of taskapp. Validated once at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="TASKAPP_", env_file=".env", extra="ignore", validate_default=True
    )

    env: Environment = Environment.DEV
    # Where `taskapp run` keeps its embedded PostgreSQL and Redis data and the dev key.
    data_dir: Path = Path(".taskapp")
    log_level: str = "INFO"
    # "json" (one object per line) or "text"; default: json in production, text otherwise.
    log_format: Literal["json", "text"] | None = None
    # One INFO line per request (logger `taskapp.access`); default: on, but off in
    # production, where the metrics count every request and a line each costs a request a
    # good share of its time. Errors are logged either way.
    access_log: bool | None = None
    # A static bearer token that may read /metrics (for a Prometheus server without OIDC).
    metrics_token: SecretStr | None = None
    # /docs and /openapi.json; false removes both.
    docs_enabled: bool = True
    # Browser origins allowed to call the API (CORS), comma-separated or a JSON list, e.g.
    # https://tasks.example.com. Empty (the default): no CORS headers, browsers on other
    # origins cannot read any answer.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Largest accepted request body. A task is at most ~10,000 characters of description,
    # which JSON escaping can make ~120 KB; anything far beyond is refused unread.
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 256 * 1024
    # Once started, move every object alive into the garbage collector's permanent
    # generation and collect less often: full collections no longer walk the framework's
    # long-lived objects, which shortens the tail latency (docs/performance.md).
    gc_freeze: bool = True

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    oidc: OIDCSettings = Field(default_factory=OIDCSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    smtp: SMTPSettings = Field(default_factory=SMTPSettings)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    # Celery's broker; default: the Redis of TASKAPP_REDIS_URL. amqp:// (RabbitMQ) works too.
    broker_url: SecretStr | None = None
    # Not "rate_limit": TASKAPP_RATE_LIMIT is the per-user rate inside this group.
    ratelimit: RateLimitSettings = Field(default_factory=RateLimitSettings)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: scheme://host[:port], no path (or '*')"
                )
        return origins

    @property
    def is_production(self) -> bool:
        return self.env is Environment.PRODUCTION

    @property
    def logs_requests(self) -> bool:
        return self.access_log if self.access_log is not None else not self.is_production

    @property
    def json_logs(self) -> bool:
        return self.log_format == "json" or (self.log_format is None and self.is_production)

    @property
    def celery_broker_url(self) -> str | None:
        """The broker in kombu's spelling (a unix:// Redis socket is redis+socket://)."""
        url = self.broker_url or self.redis.url
        if url is None:
            return None
        value = url.get_secret_value()
        return "redis+socket://" + value[len("unix://") :] if value.startswith("unix://") else value

    @model_validator(mode="after")
    def _production_is_strict(self) -> Self:
        if not self.is_production:
            return self
        problems = []
        if self.oidc.issuer is None:
            problems.append("TASKAPP_OIDC_ISSUER is required in production")
        if self.oidc.trust_dev_key:
            problems.append("TASKAPP_OIDC_TRUST_DEV_KEY must not be set in production")
        for name, secret, required in (
            ("TASKAPP_DATABASE_URL", self.database.url, True),
            ("TASKAPP_REDIS_URL", self.redis.url, True),
            ("TASKAPP_DATABASE_REPLICA_URL", self.database.replica_url, False),
        ):
            if secret is None:
                if required:
                    problems.append(f"{name} is required in production")
            elif _has_placeholder_password(secret.get_secret_value()):
                problems.append(f"{name} uses a placeholder password; set a real one")
        token = self.metrics_token.get_secret_value() if self.metrics_token else None
        if token is not None and (token.lower() in PLACEHOLDER_SECRETS or len(token) < 16):
            problems.append("TASKAPP_METRICS_TOKEN must be a real secret of 16+ characters")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _has_placeholder_password(url: str) -> bool:
    match = re.match(r"^[\w+]+://[^:/@]*:([^@]*)@", url)
    return bool(match) and match.group(1).lower() in PLACEHOLDER_SECRETS  # type: ignore[union-attr]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
