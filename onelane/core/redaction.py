"""Masking secrets (pure logic): header values named in ONELANE_REDACT_HEADERS become "***"
wherever a request or response is shown or stored."""
from __future__ import annotations

from typing import Any, Mapping

MASK = "***"


def redact_headers(headers: Mapping[str, Any] | None, names: frozenset) -> dict:
    if not headers:
        return {} if headers is None else dict(headers)
    if not isinstance(headers, Mapping):
        return headers  # malformed input is shown as it came (validation rejects it)
    return {k: (MASK if isinstance(k, str) and k.lower() in names else v) for k, v in headers.items()}


def redact_kwargs(kwargs: Mapping[str, Any], names: frozenset) -> dict:
    """A copy of callout arguments with secret header values masked."""
    out = dict(kwargs)
    if isinstance(out.get("headers"), Mapping):
        out["headers"] = redact_headers(out["headers"], names)
    return out
