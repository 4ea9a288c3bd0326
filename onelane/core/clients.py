"""One redis-py client per process and Redis URL, with bounded timeouts and retries."""
from __future__ import annotations

import os

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from onelane.core.redaction import redact_url  # noqa: F401  (REDIS_URL as shown in messages)

_clients: dict[tuple[int, str], redis.Redis] = {}


def get_client(url: str, *, ca_certs: str = "") -> redis.Redis:
    """A client for ``url`` made for this process (clients are not shared across fork)."""
    key = (os.getpid(), url)
    c = _clients.get(key)
    if c is None:
        extra = {}
        if url.startswith("rediss://"):
            extra["ssl_cert_reqs"] = "required"
            if ca_certs:
                extra["ssl_ca_certs"] = ca_certs
        c = redis.Redis.from_url(
            url,
            **extra,
            socket_connect_timeout=5,
            socket_timeout=15,  # above the longest BLPOP onelane issues (2 s)
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        _clients[key] = c
    return c


def client_for(settings) -> redis.Redis:
    """The process's client for the settings' Redis (TLS CA bundle included)."""
    return get_client(settings.redis_url, ca_certs=settings.redis_ca_certs)


def exposure_warning(client, url: str) -> str | None:
    """A warning when Redis has no password and listens beyond loopback; None otherwise."""
    from urllib.parse import urlsplit

    if urlsplit(url).password:
        return None
    try:
        bind = client.config_get("bind").get("bind", "")
        protected = client.config_get("protected-mode").get("protected-mode", "yes")
    except redis.ResponseError:  # CONFIG disabled: cannot tell
        return None
    addrs = [a.lstrip("-") for a in bind.split()] or ["*"]
    local = {"127.0.0.1", "::1", "localhost"}
    if all(a in local for a in addrs):
        return None
    return (f"Redis at {redact_url(url)} has no password and listens on {bind or 'every address'} "
            f"(protected-mode {protected}): anyone who reaches it can publish callouts. Set requirepass "
            "and put the password in REDIS_URL (redis://:password@host:6379/0)")


#: the oldest Redis onelane runs on: workers fetch with BLMOVE (onelane/delivery/transport.py)
MIN_REDIS_VERSION = (6, 2)


def version_problem(version: str) -> str | None:
    """Why a Redis server of ``version`` (as INFO reports it) cannot serve onelane; None if it can."""
    try:
        found = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None  # an unusual build string: let the commands themselves tell
    if found >= MIN_REDIS_VERSION:
        return None
    need = ".".join(map(str, MIN_REDIS_VERSION))
    return (f"Redis {version} is too old: onelane needs Redis {need} or newer (its workers fetch "
            f"messages with BLMOVE). Upgrade the server REDIS_URL points at")


def is_tls_verify_failure(exc: BaseException) -> bool:
    """Did the connection fail because the server's TLS certificate could not be verified?"""
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def is_not_redis(exc: BaseException) -> bool:
    """Did something answer on REDIS_URL, but not in Redis's protocol (an HTTP server, say)?"""
    return isinstance(exc, redis.exceptions.InvalidResponse)


def not_redis_message(url: str, exc: BaseException) -> str:
    """The one line to show when REDIS_URL points at something that is not Redis."""
    return (f"REDIS_URL {redact_url(url)} answered, but not as Redis ({exc}); point REDIS_URL at a Redis "
            "server, e.g. redis://host:6379/0")


def connect_hint(exc: BaseException) -> str:
    """What to check after a failed connection, in the user's terms."""
    if is_tls_verify_failure(exc):
        return ("the server's TLS certificate could not be verified: for a private CA set "
                "ONELANE_REDIS_CA_CERTS=/path/to/ca.pem")
    return "is redis-server running, and is REDIS_URL right?"
