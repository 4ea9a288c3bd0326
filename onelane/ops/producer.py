"""Publishing callouts from Python: :func:`submit` validates before anything is sent."""
from __future__ import annotations

import redis
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from onelane.callout.validation import validate, validate_lane
from onelane.core.clients import (
    client_for,
    connect_hint,
    is_not_redis,
    not_redis_message,
    redact_url,
    refusal_reason,
)
from onelane.core.errors import BrokerUnavailable
from onelane.core.redaction import redact_kwargs
from onelane.core.settings import get_settings


def submit(url: str | None = None, *, lane: str | None = None, **kwargs) -> AsyncResult:
    """Validate a callout and publish it to its lane (default: ONELANE_QUEUE).

    Raises ``ValueError`` (:class:`onelane.core.errors.ValidationError`) naming the bad
    argument before anything is published, and :class:`BrokerUnavailable` when Redis
    cannot be reached after bounded retries (about 3 s), or answers as something else,
    instead of hanging. The callout's ``resource`` defaults to the lane's name, so lanes
    never wait for each other.
    """
    s = get_settings()
    queue = validate_lane(lane) if lane is not None else s.queue
    req = validate({"url": url, **kwargs}, max_bytes=s.max_message_bytes)
    from onelane.celery_app import app

    try:
        # A quick check with bounded retries first: Celery's result backend would otherwise
        # retry its connection for about 20 s before giving up.
        client_for(s).ping()
        clean = req.as_kwargs()
        # what Flower and the logs show of the arguments: secrets masked
        shown = repr(redact_kwargs(clean, s.redact_headers))
        return app.send_task("tasks.callout", kwargs=clean, queue=queue, retry=True, kwargsrepr=shown)
    except redis.AuthenticationError as exc:
        raise BrokerUnavailable(
            f"Redis at {redact_url(s.redis_url)} refused the password ({exc}); check the password in REDIS_URL"
        ) from exc
    except (OperationalError, redis.RedisError) as exc:
        raise _unavailable(s, exc) from exc


def _unavailable(s, exc: Exception) -> Exception:
    """The one clear error for a publish that Redis did not take; anything unforeseen as it came."""
    reason = refusal_reason(exc) or refusal_reason(getattr(exc, "__cause__", None) or exc)
    if reason:
        return BrokerUnavailable(f"{reason} ({exc}); the callout was not published — publish it again "
                                 "once Redis accepts writes")
    if is_not_redis(exc):
        return BrokerUnavailable(not_redis_message(s.redis_url, exc))
    if isinstance(exc, (OperationalError, redis.ConnectionError, redis.TimeoutError)):
        return BrokerUnavailable(f"could not publish to Redis at {redact_url(s.redis_url)} after 3 retries "
                                 f"({exc}); {connect_hint(exc)}")
    return exc
