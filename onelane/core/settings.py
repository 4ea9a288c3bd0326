"""onelane settings: the one place the environment is read.

Every setting is optional and has a default that works on a developer machine.
A bad value raises :class:`onelane.core.errors.ConfigError` naming the variable, so a
worker, beat or producer refuses to start instead of misbehaving later.

Durations carry their unit in the field name. Relations between timeouts are
checked in :func:`check_relations`, with messages that name both values.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

from onelane.core.errors import ConfigError
from onelane.core.limits import Limit, parse_limits

#: Set by a guarded worker for its pool children: the owner written in in-flight records.
#: Internal, not a user setting.
WORKER_ID_ENV = "ONELANE_WORKER_ID"
#: Set by a worker's guard: the one queue (lane or bulk) it consumes. Internal, not a user setting.
WORKER_QUEUE_ENV = "ONELANE_WORKER_QUEUE"

#: The largest per-call ``timeout`` a callout may ask for (seconds).
MAX_CALLOUT_TIMEOUT_S = 3600.0

#: a queue (lane) name: what Redis keys and Celery queue names can carry safely
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_QUEUE_RE = QUEUE_NAME_RE
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """All onelane settings, read once from the environment."""

    redis_url: str = "redis://localhost:6379/0"
    queue: str = "serial"
    #: hard total deadline of one HTTP attempt when a call gives no ``timeout``
    callout_timeout_s: float = 60.0
    max_attempts: int = 5
    #: the guard lease of the serial queue expires this long after its last renewal
    guard_ttl_ms: int = 10_000
    #: a worker waits as hot standby instead of refusing to start
    standby: bool = False
    #: a callout lease outlives the attempt's deadline by this much
    lease_grace_ms: int = 1_000
    #: release a provably dead holder's lease at once (only for APIs that abort
    #: work when the client disconnects)
    release_dead_holder: bool = False
    #: how long a completed task id / idempotency key is remembered
    dedupe_window_s: int = 86_400
    #: how long Celery keeps task results
    result_expires_s: int = 86_400
    #: a worker's task events wait at most this long to be published together (0: Celery's own flush)
    task_events_batch_ms: int = 10
    #: how often beat runs the reaper
    reap_interval_s: float = 2.0
    #: retry backoff: full jitter over base * 2**n, capped
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    #: a Retry-After header is honoured up to this many seconds
    retry_after_max_s: float = 300.0
    #: statuses retried (connection errors and timeouts always are)
    retry_statuses: frozenset = frozenset({408, 425, 429, 500, 502, 503, 504})
    #: "strict": a retry holds the queue; "relaxed": it waits in a delay set and the queue moves on
    ordering: str = "strict"
    #: circuit breaker: open after this many consecutive retryable failures of a resource
    circuit_threshold: int = 5
    circuit_cooldown_s: float = 30.0
    circuit_cooldown_max_s: float = 300.0
    #: redirects: "same-host" (default), "any" or "none"
    redirects: str = "same-host"
    #: response bodies above this are truncated and flagged
    max_response_bytes: int = 1 << 20
    #: kombu's visibility timeout (seconds); 0 means "derive a safe value"
    visibility_timeout_s: int = 0
    #: egress: host or host:port patterns a callout may reach (empty: any public host)
    allowed_hosts: tuple = ()
    #: allow callouts to loopback, link-local and private addresses (the demo and tests do)
    allow_private_networks: bool = False
    #: worker-side per-resource headers (JSON file: {"resource": {"Header": "value"}})
    credentials_file: str = ""
    #: header names masked wherever a request or response is shown or stored
    redact_headers: frozenset = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie",
                                           "x-api-key"})
    #: the largest callout message (JSON of its arguments) accepted
    max_message_bytes: int = 1 << 20
    #: CA bundle for rediss:// (TLS) connections
    redis_ca_certs: str = ""
    #: the queue of capped (N > 1) callouts, consumed by thread-pool workers
    bulk_queue: str = "bulk"
    #: per-resource limits, parsed from ONELANE_LIMITS / ONELANE_LIMITS_FILE: (resource, Limit) pairs
    limits: tuple = ()
    #: every key onelane writes starts with this
    key_prefix: str = "onelane"
    #: start even though Redis's maxmemory-policy could evict leases (a warning instead of a refusal)
    allow_eviction: bool = False
    #: with a sentinel:// REDIS_URL: the name of the master the sentinels watch, and their password
    sentinel_master: str = ""
    sentinel_password: str = ""
    #: replicas that must confirm a write others rely on before it is acted on (Redis WAIT)
    min_replicas: int = 0
    #: how long one WAIT for those replicas may take (ms)
    replica_timeout_ms: int = 500
    #: how long a worker waits at start for a Redis it cannot reach before giving up (s)
    startup_wait_s: float = 30.0

    @property
    def uses_sentinel(self) -> bool:
        return self.redis_url.startswith("sentinel://")

    # -- the transactional outbox (onelane.ops.outbox, onelane.ops.relay)
    #: SQLAlchemy URL of the database whose outbox table beat relays ("" = beat runs no relay)
    outbox_db: str = ""
    #: how often a relay that cannot LISTEN looks for committed rows
    outbox_poll_ms: int = 100
    #: how long published rows stay in the table (0: deleted as soon as they are published)
    outbox_keep_s: int = 86_400
    #: on PostgreSQL, wake on LISTEN/NOTIFY (off: poll, e.g. behind PgBouncer in transaction mode)
    outbox_listen: bool = True

    # -- the HTTP intake (onelane.ops.intake)
    #: the HTTP intake (``onelane intake``): JSON file of hashed bearer tokens (hash -> lanes, rate);
    #: not checked here, so processes other than the intake never depend on it
    intake_tokens_file: str = ""
    #: the most callouts one batch request may carry
    intake_max_batch: int = 500
    #: the largest body of a batch request, bytes (a single callout's is ONELANE_MAX_MESSAGE_BYTES)
    intake_max_batch_bytes: int = 16 << 20

    # -- Prometheus metrics (onelane.ops.metrics)
    #: beat also serves /metrics on this port (0: it does not; ``onelane exporter`` always can)
    metrics_port: int = 0
    #: the address beat's /metrics listens on
    metrics_bind: str = "127.0.0.1"

    def limit_for(self, resource: str) -> Limit:
        """The declared limit of ``resource``; a resource without one is serial (concurrency 1)."""
        for name, limit in self.limits:
            if name == resource:
                return limit
        return Limit()

    @property
    def renew_every_ms(self) -> int:
        """The guard heartbeat interval: a third of its TTL."""
        return max(100, self.guard_ttl_ms // 3)

    @property
    def effective_visibility_timeout_s(self) -> int:
        """kombu's visibility timeout: above the longest time a message may stay unacked."""
        return self.visibility_timeout_s or self.longest_unacked_s() + 600

    def longest_unacked_s(self) -> int:
        """The longest a serial message can legitimately stay unacknowledged.

        Every attempt may use the largest allowed timeout plus the lease grace,
        every gap between attempts the largest backoff, and the first attempt may
        wait one more full lease for a killed predecessor.
        """
        lease_s = MAX_CALLOUT_TIMEOUT_S + self.lease_grace_ms / 1000
        gap_s = max(self.backoff_max_s, self.retry_after_max_s) + self.circuit_cooldown_max_s
        return int((self.max_attempts + 1) * lease_s + self.max_attempts * gap_s)


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _number(env, name, default, *, kind=float, low=None, high=None, low_open=False):
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name}={raw!r} is not {what}; unset it to use the default {default}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name}={raw!r} must be a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        raise ConfigError(
            f"{name}={raw!r} is out of range {lo}{low}, {high if high is not None else 'inf'}]; "
            f"unset it to use the default {default}"
        )
    return value


def _flag(env, name, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} must be 1 or 0 (also true/false, yes/no, on/off)")


def _choice(env, name, default: str, allowed: tuple) -> str:
    raw = _get(env, name)
    if raw is None:
        return default
    if raw.lower() not in allowed:
        raise ConfigError(f"{name}={raw!r} must be one of: {', '.join(allowed)}")
    return raw.lower()


def _statuses(env, name, default: frozenset) -> frozenset:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        codes = frozenset(int(x) for x in raw.replace(" ", "").split(",") if x)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} must be a comma-separated list of HTTP statuses, e.g. 429,503") from None
    bad = sorted(c for c in codes if not 100 <= c <= 599)
    if bad or not codes:
        raise ConfigError(f"{name}={raw!r} must list HTTP statuses between 100 and 599")
    return codes


def _host_patterns(env, name) -> tuple:
    raw = _get(env, name)
    if raw is None:
        return ()
    out = []
    for item in (x.strip().lower() for x in raw.split(",")):
        if not item:
            continue
        host, _, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
        if port and not port.isdigit():
            raise ConfigError(f"{name}: {item!r} has a bad port; use host or host:port, e.g. api.example.com:443")
        if not re.match(r"^[a-z0-9*.\-\[\]:]+$", host or item):
            raise ConfigError(f"{name}: {item!r} is not a host pattern (letters, digits, '.', '-', '*')")
        out.append(item)
    return tuple(out)


def _names(env, name, default: frozenset) -> frozenset:
    raw = _get(env, name)
    if raw is None:
        return default
    names = frozenset(x.strip().lower() for x in raw.split(",") if x.strip())
    if not names:
        raise ConfigError(f"{name}={raw!r} must list header names, e.g. Authorization,X-Api-Key")
    return names


def _path(env, name) -> str:
    raw = _get(env, name)
    if raw is None:
        return ""
    if not os.path.isfile(raw):
        raise ConfigError(f"{name}={raw!r}: no such file")
    return raw


def _queue_name(env, name, default) -> str:
    raw = _get(env, name) or default
    if not _QUEUE_RE.match(raw):
        raise ConfigError(f"{name}={raw!r} must be 1-100 letters, digits, '_', '.' or '-'")
    return raw


def _limits_json(env) -> str:
    """ONELANE_LIMITS (inline JSON) or the file named by ONELANE_LIMITS_FILE, as text."""
    inline, path = _get(env, "ONELANE_LIMITS"), _path(env, "ONELANE_LIMITS_FILE")
    if inline and path:
        raise ConfigError("set ONELANE_LIMITS or ONELANE_LIMITS_FILE, not both")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read()
    return inline or ""


def sentinel_hosts(url: str) -> list[tuple[str, int]]:
    """The (host, port) of every sentinel in a ``sentinel://h1:26379;sentinel://h2:26379`` URL."""
    out = []
    for part in url.split(";"):
        p = urlsplit(part.strip())
        out.append((p.hostname or "localhost", p.port or 26379))
    return out


def _sentinel_url(raw: str) -> str:
    for part in raw.split(";"):
        p = urlsplit(part.strip())
        if p.scheme != "sentinel":
            raise ConfigError(f"REDIS_URL={raw!r}: every address of a Sentinel URL starts with sentinel:// "
                              "(sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379)")
        if not p.hostname:
            raise ConfigError(f"REDIS_URL={raw!r}: {part!r} names no sentinel host")
        try:
            p.port
        except ValueError:
            raise ConfigError(f"REDIS_URL={raw!r}: {part!r} has a bad port") from None
    return raw


def _redis_url(env) -> str:
    raw = _get(env, "REDIS_URL") or Settings.redis_url
    parts = urlsplit(raw)
    if parts.scheme == "sentinel":
        return _sentinel_url(raw)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"REDIS_URL={raw!r} must start with redis://, rediss://, unix:// or sentinel:// "
            "(for example redis://localhost:6379/0)"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"REDIS_URL={raw!r} names no host (for example redis://localhost:6379/0)")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"REDIS_URL={raw!r} has a bad port") from None
    return raw


def _sentinel_settings(env) -> dict:
    """The Sentinel settings, checked against REDIS_URL: a master name exactly when it is sentinel://."""
    url = _get(env, "REDIS_URL") or ""
    sentinel = url.startswith("sentinel://")
    master = _get(env, "ONELANE_SENTINEL_MASTER") or ""
    if sentinel and not master:
        raise ConfigError("REDIS_URL is a sentinel:// URL: set ONELANE_SENTINEL_MASTER to the name of the master "
                          "the sentinels watch (the name in `sentinel monitor <name> ...`)")
    if master and not sentinel:
        raise ConfigError(f"ONELANE_SENTINEL_MASTER={master!r} is set but REDIS_URL is not a sentinel:// URL; "
                          "unset it, or point REDIS_URL at the sentinels")
    if master and not QUEUE_NAME_RE.match(master):
        raise ConfigError(f"ONELANE_SENTINEL_MASTER={master!r} must be letters, digits, '_', '.' or '-'")
    return {
        "sentinel_master": master,
        "sentinel_password": _get(env, "ONELANE_SENTINEL_PASSWORD") or "",
        "min_replicas": _number(env, "ONELANE_MIN_REPLICAS", 1 if sentinel else 0, kind=int, low=0, high=16),
        "replica_timeout_ms": _number(env, "ONELANE_REPLICA_TIMEOUT_MS", 500, kind=int, low=1, high=60_000),
        "startup_wait_s": _number(env, "ONELANE_STARTUP_WAIT", 30.0, low=0, high=86_400),
    }


_DB_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\+[A-Za-z0-9_]+)?://")


def _database_url(env, name) -> str:
    """A SQLAlchemy database URL (dialect[+driver]://...), checked for its shape only."""
    raw = _get(env, name)
    if raw is None:
        return ""
    if not _DB_URL_RE.match(raw):
        raise ConfigError(
            f"{name}: {raw.split('@')[-1]!r} is not a database URL; use a SQLAlchemy URL such as "
            "postgresql+psycopg://user:password@host:5432/db or sqlite:////path/to/app.db"
        )
    return raw


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and check every setting; raise ConfigError naming the first bad variable."""
    env = os.environ if env is None else env
    queue = _get(env, "ONELANE_QUEUE") or Settings.queue
    if not _QUEUE_RE.match(queue):
        raise ConfigError(
            f"ONELANE_QUEUE={queue!r} must be 1-100 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    prefix = _get(env, "ONELANE_KEY_PREFIX") or Settings.key_prefix
    if not _QUEUE_RE.match(prefix):
        raise ConfigError(f"ONELANE_KEY_PREFIX={prefix!r} must be letters, digits, '_', '.' or '-'")
    s = Settings(
        redis_url=_redis_url(env),
        queue=queue,
        callout_timeout_s=_number(
            env, "ONELANE_CALLOUT_TIMEOUT", 60.0, low=0, high=MAX_CALLOUT_TIMEOUT_S, low_open=True
        ),
        max_attempts=_number(env, "ONELANE_MAX_ATTEMPTS", 5, kind=int, low=1, high=100),
        guard_ttl_ms=int(_number(env, "ONELANE_GUARD_TTL", 10.0, low=1, high=3600) * 1000),
        standby=_flag(env, "ONELANE_STANDBY", False),
        lease_grace_ms=int(_number(env, "ONELANE_LEASE_GRACE", 1.0, low=0, high=600) * 1000),
        release_dead_holder=_flag(env, "ONELANE_RELEASE_DEAD_HOLDER", False),
        dedupe_window_s=_number(env, "ONELANE_DEDUPE_WINDOW", 86_400, kind=int, low=1),
        result_expires_s=_number(env, "ONELANE_RESULT_EXPIRES", 86_400, kind=int, low=1),
        task_events_batch_ms=_number(env, "ONELANE_TASK_EVENTS_BATCH_MS", 10, kind=int, low=0, high=10_000),
        reap_interval_s=_number(env, "ONELANE_REAP_INTERVAL", 2.0, low=0.1, high=3600),
        backoff_base_s=_number(env, "ONELANE_BACKOFF_BASE", 1.0, low=0, high=3600),
        backoff_max_s=_number(env, "ONELANE_BACKOFF_MAX", 60.0, low=0, high=3600),
        max_response_bytes=_number(
            env, "ONELANE_MAX_RESPONSE_BYTES", 1 << 20, kind=int, low=1, high=1 << 30
        ),
        visibility_timeout_s=_number(env, "ONELANE_VISIBILITY_TIMEOUT", 0, kind=int, low=0),
        retry_after_max_s=_number(env, "ONELANE_RETRY_AFTER_MAX", 300.0, low=0, high=3600),
        retry_statuses=_statuses(env, "ONELANE_RETRY_STATUSES", Settings.retry_statuses),
        ordering=_choice(env, "ONELANE_ORDERING", "strict", ("strict", "relaxed")),
        circuit_threshold=_number(env, "ONELANE_CIRCUIT_THRESHOLD", 5, kind=int, low=1, high=10_000),
        circuit_cooldown_s=_number(env, "ONELANE_CIRCUIT_COOLDOWN", 30.0, low=0.1, high=3600),
        circuit_cooldown_max_s=_number(env, "ONELANE_CIRCUIT_COOLDOWN_MAX", 300.0, low=0.1, high=3600),
        redirects=_choice(env, "ONELANE_REDIRECTS", "same-host", ("same-host", "any", "none")),
        key_prefix=prefix,
        allowed_hosts=_host_patterns(env, "ONELANE_ALLOWED_HOSTS"),
        allow_private_networks=_flag(env, "ONELANE_ALLOW_PRIVATE_NETWORKS", False),
        credentials_file=_path(env, "ONELANE_CREDENTIALS_FILE"),
        redact_headers=_names(env, "ONELANE_REDACT_HEADERS", Settings.redact_headers),
        max_message_bytes=_number(env, "ONELANE_MAX_MESSAGE_BYTES", 1 << 20, kind=int, low=1024, high=1 << 28),
        redis_ca_certs=_path(env, "ONELANE_REDIS_CA_CERTS"),
        bulk_queue=_queue_name(env, "ONELANE_BULK_QUEUE", "bulk"),
        limits=tuple(sorted(parse_limits(_limits_json(env)).items())),
        intake_tokens_file=_get(env, "ONELANE_INTAKE_TOKENS_FILE") or "",
        intake_max_batch=_number(env, "ONELANE_INTAKE_MAX_BATCH", 500, kind=int, low=1, high=100_000),
        intake_max_batch_bytes=_number(env, "ONELANE_INTAKE_MAX_BATCH_BYTES", 16 << 20, kind=int, low=1024,
                                       high=1 << 30),
        allow_eviction=_flag(env, "ONELANE_ALLOW_EVICTION", False),
        outbox_db=_database_url(env, "ONELANE_OUTBOX_DB"),
        outbox_poll_ms=_number(env, "ONELANE_OUTBOX_POLL_MS", 100, kind=int, low=1, high=60_000),
        outbox_keep_s=_number(env, "ONELANE_OUTBOX_KEEP", 86_400, kind=int, low=0, high=366 * 86_400),
        outbox_listen=_flag(env, "ONELANE_OUTBOX_LISTEN", True),
        metrics_port=_number(env, "ONELANE_METRICS_PORT", 0, kind=int, low=0, high=65535),
        metrics_bind=_get(env, "ONELANE_METRICS_BIND") or Settings.metrics_bind,
        **_sentinel_settings(env),
    )
    check_relations(s)
    if s.bulk_queue == s.queue:
        raise ConfigError(f"ONELANE_BULK_QUEUE={s.bulk_queue!r} must differ from ONELANE_QUEUE={s.queue!r}")
    return s


def check_relations(s: Settings) -> None:
    """Check the relations between timeouts; raise ConfigError naming both values."""
    if s.backoff_max_s < s.backoff_base_s:
        raise ConfigError(
            f"ONELANE_BACKOFF_MAX={s.backoff_max_s} is below ONELANE_BACKOFF_BASE="
            f"{s.backoff_base_s}; the cap must be at least the base"
        )
    if s.circuit_cooldown_max_s < s.circuit_cooldown_s:
        raise ConfigError(
            f"ONELANE_CIRCUIT_COOLDOWN_MAX={s.circuit_cooldown_max_s:g} is below ONELANE_CIRCUIT_COOLDOWN="
            f"{s.circuit_cooldown_s:g}; the cap must be at least the first cool-down"
        )
    if s.visibility_timeout_s and s.visibility_timeout_s <= s.longest_unacked_s():
        raise ConfigError(
            f"ONELANE_VISIBILITY_TIMEOUT={s.visibility_timeout_s} s is not above the longest time a "
            f"serial message may stay unacknowledged ({s.longest_unacked_s()} s = "
            f"(ONELANE_MAX_ATTEMPTS={s.max_attempts} + 1) x (max timeout {MAX_CALLOUT_TIMEOUT_S:g} s + "
            f"ONELANE_LEASE_GRACE) + the longest waits between attempts (backoff, Retry-After, "
            f"circuit cool-down)); "
            "kombu would restore a running message and the callout would run twice. "
            "Raise it or unset it to derive a safe value"
        )
    if s.renew_every_ms * 2 >= s.guard_ttl_ms:
        raise ConfigError(
            f"ONELANE_GUARD_TTL={s.guard_ttl_ms / 1000:g} s is too short for its renewal interval "
            f"({s.renew_every_ms} ms); the renewal must come in under half the TTL"
        )


_cached: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, loaded on first use."""
    global _cached
    if _cached is None:
        _cached = load_settings()
    return _cached


def reset_settings_cache() -> None:
    """Forget the cached settings (tests that change the environment use this)."""
    global _cached
    _cached = None
