"""The one bytes-to-text helper: Redis replies arrive as bytes (or str with decode_responses)."""
from __future__ import annotations


def text(value) -> str:
    """``value`` as text: bytes decoded as UTF-8, None as "", anything else through ``str``."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def text_map(mapping) -> dict[str, str]:
    """A Redis hash reply (HGETALL) with keys and values as text."""
    return {text(k): text(v) for k, v in (mapping or {}).items()}
