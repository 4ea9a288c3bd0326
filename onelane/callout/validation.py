"""Check a callout's arguments before anything is published or called.

Pure logic, shared by :func:`onelane.submit` (raises at once in the producer) and the
``tasks.callout`` task (a bad message sent with plain ``send_task`` fails at once,
is dead-lettered and never reaches the API). Every error is a
:class:`onelane.core.errors.ValidationError` naming the argument.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from onelane.core.errors import ValidationError
from onelane.core.redaction import redact_url
from onelane.core.settings import MAX_CALLOUT_TIMEOUT_S, QUEUE_NAME_RE
from onelane.delivery.coalescing import coalesce_key_problem

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
#: headers onelane sets itself on every request
RESERVED_HEADERS = ("idempotency-key", "x-fencing-token")
#: headers the HTTP client owns: the target host, and hop-by-hop headers of one connection
TRANSPORT_HEADERS = ("host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
                     "trailer", "upgrade", "content-length", "expect")
ARGUMENTS = (
    "url", "method", "json", "data", "headers", "params", "timeout", "resource", "idempotency_key",
    "retry_on", "coalesce_key",
)
MAX_KEY_LENGTH = 200
MAX_HEADERS = 50
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 8192
MAX_RESOURCE_LENGTH = 200


@dataclass(frozen=True)
class CalloutRequest:
    """A checked callout: every field has its final type and default."""

    url: str
    method: str = "POST"
    json: Any = None
    has_json: bool = False
    data: Any = None
    headers: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    timeout_s: float | None = None
    resource: str | None = None
    idempotency_key: str | None = None
    retry_on: tuple | None = None
    #: callouts with one key on one queue coalesce while they wait (onelane.delivery.coalescing)
    coalesce_key: str | None = None

    def as_kwargs(self) -> dict:
        """The normalised keyword arguments, as they travel in the message."""
        out: dict[str, Any] = {"url": self.url, "method": self.method}
        if self.has_json:
            out["json"] = self.json
        if self.data is not None:
            out["data"] = self.data
        if self.headers:
            out["headers"] = dict(self.headers)
        if self.params:
            out["params"] = dict(self.params)
        if self.timeout_s is not None:
            out["timeout"] = self.timeout_s
        if self.resource is not None:
            out["resource"] = self.resource
        if self.idempotency_key is not None:
            out["idempotency_key"] = self.idempotency_key
        if self.retry_on is not None:
            out["retry_on"] = list(self.retry_on)
        if self.coalesce_key is not None:
            out["coalesce_key"] = self.coalesce_key
        return out


def validate(kwargs: Mapping[str, Any], *, max_bytes: int | None = None) -> CalloutRequest:
    """Check callout keyword arguments; return a :class:`CalloutRequest` or raise ValidationError.

    ``max_bytes`` limits the size of the arguments as JSON (the message size).
    """
    if not isinstance(kwargs, Mapping):
        raise ValidationError("kwargs", f"must be a mapping of keyword arguments, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - set(ARGUMENTS))
    if unknown:
        raise ValidationError(
            unknown[0], f"is not a callout argument; allowed: {', '.join(ARGUMENTS)}"
        )
    url = _url(kwargs.get("url"))
    method = _method(kwargs.get("method", "POST"))
    has_json = "json" in kwargs and kwargs["json"] is not None
    has_data = "data" in kwargs and kwargs["data"] is not None
    if has_json and has_data:
        raise ValidationError("json", "give json or data, not both")
    if has_json:
        _json_safe("json", kwargs["json"])
    data = kwargs.get("data") if has_data else None
    if has_data:
        if isinstance(data, Mapping):
            _str_map("data", data)
        elif not isinstance(data, str):
            raise ValidationError("data", f"must be a string or a mapping of strings, got {type(data).__name__}")
    headers = _headers(kwargs.get("headers"))
    params = _params(kwargs.get("params"))
    timeout_s = _timeout(kwargs.get("timeout"))
    resource = _resource(kwargs.get("resource"))
    key = _key(kwargs.get("idempotency_key"))
    retry_on = _retry_on(kwargs.get("retry_on"))
    coalesce_key = _coalesce_key(kwargs.get("coalesce_key"))
    size = check_payload(kwargs)
    if max_bytes is not None and size > max_bytes:
        raise ValidationError(
            "payload", f"is {size} bytes as JSON, above the limit of {max_bytes} (ONELANE_MAX_MESSAGE_BYTES)")
    return CalloutRequest(
        url=url, method=method, json=kwargs.get("json") if has_json else None, has_json=has_json,
        data=data, headers=headers, params=params, timeout_s=timeout_s, resource=resource,
        idempotency_key=key, retry_on=retry_on, coalesce_key=coalesce_key,
    )


def _url(url) -> str:
    if url is None or url == "":
        raise ValidationError("url", "is required (an http:// or https:// URL)")
    if not isinstance(url, str):
        raise ValidationError("url", f"must be a string, got {type(url).__name__}")
    shown = redact_url(url)  # an error message is logged and stored: never with a password in it
    try:
        parts = urlsplit(url)
        parts.port  # raises on a bad port
    except ValueError as exc:
        raise ValidationError("url", f"is not a valid URL ({exc}): {shown!r}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValidationError("url", f"must use http or https, got {parts.scheme or 'no scheme'!r}: {shown!r}")
    if not parts.hostname:
        raise ValidationError("url", f"has no host: {shown!r}")
    if any(c.isspace() for c in url):
        raise ValidationError("url", f"must not contain white space: {shown!r}")
    if parts.username is not None or parts.password is not None:
        raise ValidationError(
            "url", f"must not carry a user name or password ({shown!r}): it would travel in the message and be "
            "stored with it. Put the credentials in the worker's ONELANE_CREDENTIALS_FILE (e.g. an "
            "Authorization header for this callout's resource) and leave them out of the URL")
    return url


def _method(method) -> str:
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise ValidationError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    return method.upper()


def _str_map(name: str, value) -> dict:
    if not isinstance(value, Mapping):
        raise ValidationError(name, f"must be a mapping of strings to strings, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValidationError(name, f"must map strings to strings; {k!r}: {v!r} is not")
    return dict(value)


def _headers(headers) -> dict:
    if headers is None:
        return {}
    headers = _str_map("headers", headers)
    if len(headers) > MAX_HEADERS:
        raise ValidationError("headers", f"at most {MAX_HEADERS} headers, got {len(headers)}")
    for k, v in headers.items():
        if len(k) > MAX_HEADER_NAME or len(v) > MAX_HEADER_VALUE:
            raise ValidationError(
                "headers", f"{k[:40]!r}: names are limited to {MAX_HEADER_NAME} and values to "
                f"{MAX_HEADER_VALUE} characters")
        if not k or not k.isascii() or any(c in k for c in " \t\r\n:"):
            raise ValidationError("headers", f"{k!r} is not a valid header name (ASCII, no spaces or ':')")
        if not _latin1(v):
            raise ValidationError(
                "headers", f"the value of {k!r} has characters HTTP headers cannot carry (only Latin-1); "
                "percent- or base64-encode it")
        if "\r" in v or "\n" in v:
            raise ValidationError("headers", f"the value of {k!r} contains a line break")
        if k.lower() in TRANSPORT_HEADERS:
            raise ValidationError(
                "headers", f"{k!r} is set by the HTTP client for the URL and connection; leave it out "
                "(the Host header always names the URL's host)")
        if k.lower() in RESERVED_HEADERS:
            raise ValidationError(
                "headers",
                f"{k!r} is set by onelane; pass idempotency_key=... instead of an Idempotency-Key header",
            )
    return headers


def _params(params) -> dict:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ValidationError("params", f"must be a mapping, got {type(params).__name__}")
    ok = (str, int, float)
    for k, v in params.items():
        items = v if isinstance(v, list) else [v]
        if not isinstance(k, str) or not all(isinstance(i, ok) and not isinstance(i, bool) for i in items):
            raise ValidationError("params",
                                  f"must map strings to strings, numbers or lists of them; {k!r}: {v!r} is not")
    return dict(params)


def _timeout(timeout) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValidationError("timeout", f"must be a number of seconds, got {timeout!r}")
    if not 0 < timeout <= MAX_CALLOUT_TIMEOUT_S:  # also refuses nan, inf and ints too large for a float
        raise ValidationError("timeout", f"must be in (0, {MAX_CALLOUT_TIMEOUT_S:g}] seconds, got {timeout!r}")
    return float(timeout)


def _resource(resource) -> str | None:
    if resource is None:
        return None
    if not isinstance(resource, str) or not resource.strip():
        raise ValidationError("resource", f"must be a non-empty string, got {resource!r}")
    if len(resource) > MAX_RESOURCE_LENGTH or any(c.isspace() for c in resource):
        raise ValidationError(
            "resource", f"must be at most {MAX_RESOURCE_LENGTH} characters without white space, got {resource[:50]!r}"
        )
    return resource


def _key(key) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not key:
        raise ValidationError("idempotency_key", f"must be a non-empty string, got {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise ValidationError("idempotency_key", f"must be at most {MAX_KEY_LENGTH} characters, got {len(key)}")
    if any(c in key for c in "\r\n"):
        raise ValidationError("idempotency_key", "must not contain line breaks")
    if not _latin1(key):
        raise ValidationError("idempotency_key", "is sent as a header, so it may only hold Latin-1 characters")
    return key


def _coalesce_key(key) -> str | None:
    if key is None:
        return None
    problem = coalesce_key_problem(key)
    if problem is not None:
        raise ValidationError("coalesce_key", problem)
    return key


def _latin1(text: str) -> bool:
    return all(ord(c) <= 0xFF for c in text)


def _retry_on(value) -> tuple | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(x, int) and not isinstance(x, bool) and 100 <= x <= 599 for x in value
    ):
        raise ValidationError("retry_on", f"must be a list of HTTP statuses (100-599), got {value!r}")
    return tuple(sorted(set(value)))


def _json_safe(name: str, value) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(name, f"is not JSON-serialisable: {exc}") from None


def check_payload(kwargs: Mapping[str, Any]) -> int:
    """The whole message must be JSON-serialisable (the only serializer onelane accepts); returns its size."""
    try:
        return len(json.dumps(dict(kwargs), allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise ValidationError("payload", f"is not JSON-serialisable: {exc}") from None


def validate_lane(lane) -> str:
    """A lane (queue) name: 1-100 letters, digits, '_', '.' or '-', starting with a letter or digit."""
    if not isinstance(lane, str) or not QUEUE_NAME_RE.match(lane):
        raise ValidationError("lane", f"must be 1-100 letters, digits, '_', '.' or '-', starting with a letter or "
                                      f"digit, got {lane!r}")
    return lane
