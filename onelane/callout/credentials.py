"""Worker-side credentials: headers per resource, read from the file named by
ONELANE_CREDENTIALS_FILE, merged into the request at call time and never stored in a
message, result, in-flight record, dead letter or log line.

The file is JSON: {"acme": {"Authorization": "Bearer ..."}, "billing": {"X-Api-Key": "..."}}.
"""
from __future__ import annotations

import json
import os

from onelane.core.errors import ConfigError

_cache: dict[str, tuple[float, dict]] = {}


def load(path: str) -> dict[str, dict[str, str]]:
    """The credentials map; re-read when the file changes. Raises ConfigError naming the variable."""
    if not path:
        return {}
    try:
        mtime = os.stat(path).st_mtime
    except OSError as exc:
        raise ConfigError(f"ONELANE_CREDENTIALS_FILE={path!r}: {exc.strerror}") from None
    cached = _cache.get(path)
    if cached and cached[0] == mtime:
        return cached[1]
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"ONELANE_CREDENTIALS_FILE={path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(r, str) and isinstance(h, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in h.items())
        for r, h in data.items()
    ):
        raise ConfigError(
            f"ONELANE_CREDENTIALS_FILE={path!r} must map resource names to header mappings, "
            'e.g. {"acme": {"Authorization": "Bearer ..."}}'
        )
    _cache[path] = (mtime, data)
    return data


def headers_for(path: str, resource: str) -> dict[str, str]:
    return dict(load(path).get(resource, {}))
