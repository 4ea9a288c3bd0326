"""One redis-py client per process and Redis URL, with bounded timeouts and retries."""
from __future__ import annotations

import logging
import os
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from onelane.core.pipeline import OnelaneRedis
from onelane.core.redaction import redact_url  # noqa: F401  (REDIS_URL as shown in messages)
from onelane.core.settings import sentinel_hosts

_clients: dict[tuple[int, str], OnelaneRedis] = {}


_COMMON = dict(socket_connect_timeout=5,
               socket_timeout=15,  # above the longest BLPOP onelane issues (2 s)
               health_check_interval=15)


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), 3)


def _quick_retry() -> Retry:
    """For asking sentinels: one quick retry (redis-py's default backs off for seconds per sentinel)."""
    return Retry(ExponentialBackoff(cap=0.2, base=0.05), 1)


def get_client(url: str, *, ca_certs: str = "", sentinel_master: str = "", sentinel_password: str = "") -> redis.Redis:
    """A client for ``url`` made for this process (clients are not shared across fork).

    For a ``sentinel://`` URL the client follows the current master: it asks the sentinels
    where the master is on every new connection, so after a failover it reconnects there.
    """
    key = (os.getpid(), url, sentinel_master)
    c = _clients.get(key)
    if c is None and url.startswith("sentinel://"):
        c = _clients[key] = _sentinel_master_client(url, sentinel_master, sentinel_password)
    if c is None:
        extra = {}
        if url.startswith("rediss://"):
            extra["ssl_cert_reqs"] = "required"
            if ca_certs:
                extra["ssl_ca_certs"] = ca_certs
        c = OnelaneRedis.from_url(url, **extra, **_COMMON, retry=_retry(),
                                  retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        _clients[key] = c
    return c


def client_for(settings) -> redis.Redis:
    """The process's client for the settings' Redis (TLS CA bundle and Sentinel master included)."""
    return get_client(settings.redis_url, ca_certs=settings.redis_ca_certs,
                      sentinel_master=settings.sentinel_master, sentinel_password=settings.sentinel_password)


def _sentinel_master_client(url: str, master: str, sentinel_password: str) -> redis.Redis:
    from urllib.parse import urlsplit

    from redis.sentinel import Sentinel

    first = urlsplit(url.split(";")[0])
    db = int((first.path or "/0").lstrip("/") or 0)
    sentinels = Sentinel(sentinel_hosts(url), socket_timeout=2, socket_connect_timeout=2,
                         sentinel_kwargs={"password": sentinel_password or None, "socket_timeout": 2,
                                          "socket_connect_timeout": 2, "retry": _quick_retry()})
    return sentinels.master_for(master, redis_class=OnelaneRedis, password=first.password, username=first.username,
                                db=db, retry=_retry(),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError], **_COMMON)


def sentinel_problem(settings, exc: BaseException) -> str | None:
    """What a Sentinel set-up's start-up error means, naming the setting to check; None if not one."""
    from redis.sentinel import MasterNotFoundError

    if not settings.uses_sentinel or not isinstance(exc, (MasterNotFoundError, redis.ConnectionError)):
        return None
    where = ", ".join(f"{h}:{p}" for h, p in sentinel_hosts(settings.redis_url))
    known = _known_masters(settings)
    if known is None:
        return (f"none of the sentinels in REDIS_URL ({where}) answered; are they running, and is REDIS_URL right "
                "(sentinel://h1:26379;sentinel://h2:26379;...)? With a sentinel password, set "
                "ONELANE_SENTINEL_PASSWORD")
    if settings.sentinel_master not in known:
        return (f"ONELANE_SENTINEL_MASTER={settings.sentinel_master!r} is not known to the sentinels at {where} "
                f"(they watch: {', '.join(sorted(known)) or 'nothing'}); set it to one of those")
    return (f"the sentinels at {where} know {settings.sentinel_master!r} but its master does not answer; "
            "a failover may be under way")


def sentinel_master_view(settings) -> tuple[tuple[str, int], bool]:
    """((host, port) of the master the sentinels name, True when no failover is under way), from the
    first sentinel that answers; raises redis.ConnectionError when none does."""
    last = None
    for host, port in sentinel_hosts(settings.redis_url):
        try:
            c = _sentinel_client(host, port, settings.sentinel_password)
            info = c.sentinel_master(settings.sentinel_master)
            flags = set(str(info.get("flags", "")).split(","))
            settled = not flags & {"failover_in_progress", "s_down", "o_down"}
            return (str(info.get("ip", "")), int(info.get("port", 0))), settled
        except redis.RedisError as exc:
            last = exc
    raise redis.ConnectionError(f"no sentinel answered ({last})")


_sentinel_clients: dict = {}


def _sentinel_client(host: str, port: int, password: str) -> redis.Redis:
    key = (os.getpid(), host, port)
    c = _sentinel_clients.get(key)
    if c is None:
        c = _sentinel_clients[key] = redis.Redis(host=host, port=port, password=password or None, socket_timeout=2,
                                                 socket_connect_timeout=2, retry=_quick_retry(),
                                                 decode_responses=True)
    return c


def _known_masters(settings) -> set[str] | None:
    """The master names any sentinel of the settings watches; None when none answers."""
    for host, port in sentinel_hosts(settings.redis_url):
        try:
            c = redis.Redis(host=host, port=port, password=settings.sentinel_password or None, socket_timeout=2,
                            socket_connect_timeout=2, retry=_quick_retry())
            return set(c.sentinel_masters())
        except redis.RedisError:
            continue
    return None


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


# -- a Redis that refuses for a while -----------------------------------------------------------
#: answers that mean "not now" rather than "never": waited out, never a reason to exit
_REFUSALS = {
    "OOM": "Redis is out of memory (maxmemory reached, policy noeviction) and refuses writes",
    "LOADING": "Redis is loading its data set after a restart",
    "BUSY": "Redis is busy running a script",
    "READONLY": "Redis is a read-only replica (a failover under way?)",
    "MASTERDOWN": "the Redis replica has lost its master",
    "TRYAGAIN": "Redis asked to try again",
    "EXECABORT": "Redis refused a transaction (it refused one of its commands)",
}


def refusal_reason(exc: BaseException) -> str | None:
    """Why Redis refused, if it is a refusal that passes (out of memory, loading, busy,
    read-only); None for any other error."""
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return _REFUSALS["LOADING"]
    if isinstance(exc, (redis.exceptions.ResponseError,)):
        head = str(exc).split(" ", 1)[0].upper()
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or head.startswith("OOM"):
            return _REFUSALS["OOM"]
        if isinstance(exc, redis.exceptions.ReadOnlyError):
            return _REFUSALS["READONLY"]
        return _REFUSALS.get(head)
    return None


def transient_reason(exc: BaseException) -> str | None:
    """Why Redis cannot serve right now, if it is worth waiting for (unreachable, timed out, or
    refusing for a while); None for errors that waiting cannot cure (a wrong password, not Redis)."""
    if isinstance(exc, (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)):
        return None
    from onelane.core.replication import NotReplicated

    if isinstance(exc, NotReplicated):
        return f"Redis replicas did not confirm in time ({exc}); a write is not acted on before they do"
    reason = refusal_reason(exc)
    if reason is not None:
        return reason
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return f"Redis is unreachable ({exc})"
    return None


def ride_out(fn, *, what: str, log: logging.Logger, should_stop=None, max_wait_s: float | None = None,
             sleep=time.sleep, monotonic=time.monotonic):
    """Call ``fn`` until it works while Redis refuses for a while or is away; return its result.

    Waits with a backoff (50 ms doubling to 1 s) and logs once per spell, naming the reason
    and what waits. Raises at once for any other error; raises the last refusal when
    ``should_stop()`` turns true or ``max_wait_s`` has passed.
    """
    spell_started = None
    delay = 0.05
    while True:
        try:
            result = fn()
        except redis.RedisError as exc:
            reason = transient_reason(exc)
            if reason is None:
                raise
            now = monotonic()
            if spell_started is None:
                spell_started = now
                log.warning("onelane: %s; %s waits and tries again", reason, what)
            if (should_stop and should_stop()) or (max_wait_s is not None and now - spell_started > max_wait_s):
                raise
            sleep(delay)
            delay = min(1.0, delay * 2)
            continue
        if spell_started is not None:
            log.warning("onelane: Redis answers again; %s goes on (waited %.1f s)", what, monotonic() - spell_started)
        return result


# -- the eviction policy ------------------------------------------------------------------------------
def eviction_problem(info_memory: dict) -> str | None:
    """Why this Redis could evict onelane's leases (its maxmemory-policy), or None when it cannot.

    Read from INFO memory, which managed Redis services answer even with CONFIG disabled.
    """
    policy = str(info_memory.get("maxmemory_policy", "noeviction"))
    if policy == "noeviction":
        return None
    return (f"Redis's maxmemory-policy is {policy!r}: under memory pressure it may evict keys"
            + (" with an expiry — onelane's leases — " if policy.startswith("volatile") else " — leases among them — ")
            + "and a second worker would then call the API while the first still does. Set "
            "`maxmemory-policy noeviction` (CONFIG SET maxmemory-policy noeviction, or in redis.conf; on a "
            "managed service, in its parameter group); ONELANE_ALLOW_EVICTION=1 starts anyway, at that risk")
