"""Masking secrets (pure logic): header values named in ONELANE_REDACT_HEADERS, and the
user name and password of a URL, become "***" wherever a request or response is shown or stored."""
from __future__ import annotations

from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def redact_url(url: Any) -> Any:
    """The URL with any user name and password replaced by ***; anything else as it came."""
    if not isinstance(url, str) or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("@", 1)[-1] if "://" not in url else f"{url.split('://', 1)[0]}://{MASK}@?"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{MASK}@{host}"))


def redact_headers(headers: Mapping[str, Any] | None, names: frozenset) -> dict:
    if not headers:
        return {} if headers is None else dict(headers)
    if not isinstance(headers, Mapping):
        return headers  # malformed input is shown as it came (validation rejects it)
    return {k: (MASK if isinstance(k, str) and k.lower() in names else v) for k, v in headers.items()}


def redact_kwargs(kwargs: Mapping[str, Any], names: frozenset) -> dict:
    """A copy of callout arguments with secret header values and URL credentials masked."""
    out = dict(kwargs)
    if isinstance(out.get("headers"), Mapping):
        out["headers"] = redact_headers(out["headers"], names)
    if "url" in out:
        out["url"] = redact_url(out["url"])
    return out
