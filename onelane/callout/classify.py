"""What one attempt's reply means, and how long to wait before the next (pure logic).

:func:`classify` is the one place that answers "what happens on a 429?": a status below
400 that the policy does not retry is a success; connection errors, timeouts and the
policy's retry statuses (408, 425, 429, 500, 502, 503, 504 by default) are retried after
a full-jitter backoff, or after the server's ``Retry-After`` (capped), until the attempts
run out; every other answer (other 4xx, a refused redirect or address, a host name that
does not resolve) fails at once. The verdict also says what the resource's circuit
breaker learns from the reply.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

#: statuses worth another attempt: the server asked us to wait or failed transiently
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

SUCCEEDED, RETRY, FAILED = "succeeded", "retry", "failed"


@dataclass(frozen=True)
class RetryPolicy:
    """Which replies are retried, how often, and how long to wait in between."""

    retry_statuses: frozenset = RETRYABLE_STATUSES
    max_attempts: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0

    @classmethod
    def of(cls, settings, retry_on=None) -> "RetryPolicy":
        """The settings' policy; a call's own ``retry_on`` replaces the retried statuses."""
        return cls(
            retry_statuses=frozenset(retry_on) if retry_on is not None else settings.retry_statuses,
            max_attempts=settings.max_attempts,
            backoff_base_s=settings.backoff_base_s,
            backoff_max_s=settings.backoff_max_s,
            retry_after_max_s=settings.retry_after_max_s,
        )


@dataclass(frozen=True)
class Reply:
    """What one attempt got back: a response, or an error (and whether another attempt could help)."""

    response: Any = None  # an onelane.callout.http.Response
    error: str | None = None
    #: the error cannot be cured by trying again (bad host name, refused redirect or address)
    permanent: bool = False
    started: float = 0.0  # epoch seconds
    elapsed_ms: float = 0.0

    @property
    def status(self) -> int | None:
        return self.response.status_code if self.response is not None else None

    def header(self, name: str) -> str | None:
        return self.response.headers.get(name) if self.response is not None else None

    def describe(self) -> str:
        """The error, or the status and the start of the body, for logs and dead letters."""
        if self.response is None:
            return self.error or "no response"
        return f"{self.response.status_code} {snippet(self.response)}".rstrip()


@dataclass(frozen=True)
class Verdict:
    """What to do after an attempt: done, try again after ``wait_s``, or fail for good."""

    kind: str  # SUCCEEDED, RETRY or FAILED
    reason: str = ""
    wait_s: float = 0.0
    #: what the server asked for in Retry-After (seconds), if it did
    retry_after_s: float | None = None
    #: what the circuit breaker records: True the API is up, False it failed, None nothing
    api_up: bool | None = None

    @property
    def succeeded(self) -> bool:
        return self.kind == SUCCEEDED

    @property
    def final(self) -> bool:
        """No other attempt follows: the callout is dead-lettered."""
        return self.kind == FAILED


def classify(reply: Reply, *, attempt: int, policy: RetryPolicy, rng: random.Random | None = None,
             now: float | None = None) -> Verdict:
    """The verdict on attempt number ``attempt`` (1-based) that got ``reply``."""
    status = reply.status
    if status is not None and status < 400 and status not in policy.retry_statuses:
        return Verdict(SUCCEEDED, api_up=True)
    what = reply.describe()
    if reply.permanent or (status is not None and status not in policy.retry_statuses):
        # the API answered (it is up), or the call could not be made at all: neither opens the circuit
        return Verdict(FAILED, f"{what} (not retryable)", api_up=True if status is not None else None)
    if attempt >= policy.max_attempts:
        return Verdict(FAILED, f"failed after {attempt} attempts; last: {what}", api_up=False)
    wait = backoff_s(attempt, base_s=policy.backoff_base_s, max_s=policy.backoff_max_s, rng=rng)
    asked = retry_after_s(reply.header("Retry-After"), now=now)
    if asked is not None:
        wait = min(asked, policy.retry_after_max_s)
    return Verdict(RETRY, what, wait_s=wait, retry_after_s=asked, api_up=False)


def overloaded(reply: Reply) -> bool:
    """Did the API say it is overloaded (429, 503) or fail to answer in time? (for the adaptive cap)"""
    return reply.status in (429, 503) or (reply.error is not None and reply.error.startswith("timeout"))


def snippet(response, limit: int = 200) -> str:
    """The start of a response body as one line of text."""
    body = response.body[:limit].decode(response.encoding or "utf-8", errors="replace")
    return " ".join(body.split())[:limit]


def is_retryable_status(status: int, retryable=RETRYABLE_STATUSES) -> bool:
    return status in retryable


def backoff_s(attempt: int, *, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(max, base * 2**(attempt-1))] after failed attempt ``attempt``."""
    ceiling = min(max_s, base_s * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(0, ceiling)


def retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delta-seconds or HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
