"""Per-resource limits (pure logic): concurrency cap, rate, adaptive.

Declared in ONELANE_LIMITS (inline JSON) or the file named by ONELANE_LIMITS_FILE::

    {"acme": {"concurrency": 25, "rate": "50/s", "adaptive": true}}

A resource without an entry has concurrency 1 and no rate limit (the serial case).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from onelane.core.errors import ConfigError

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute)\s*$")
MAX_CONCURRENCY = 1000


@dataclass(frozen=True)
class Limit:
    concurrency: int = 1
    #: calls per second (None: no rate limit)
    rate_per_s: float | None = None
    adaptive: bool = False

    @property
    def capped(self) -> bool:
        """True when the resource needs the semaphore/rate machinery rather than the plain lease."""
        return self.concurrency > 1 or self.rate_per_s is not None or self.adaptive


def parse_rate(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        per_s = float(value)
    else:
        m = _RATE_RE.match(str(value))
        if not m:
            raise ConfigError(f"{where}: rate {value!r} must look like '50/s' or '600/m' (or a number per second)")
        per_s = float(m.group(1)) / (1 if m.group(2).startswith("s") else 60)
    if per_s <= 0:
        raise ConfigError(f"{where}: rate must be above 0, got {value!r}")
    return per_s


def parse_limits(text: str) -> dict[str, Limit]:
    """Parse the limits JSON; raise ConfigError naming the resource and the field."""
    if not text or not text.strip():
        return {}
    where = "ONELANE_LIMITS"
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f'{where} must map resource names to limits, e.g. {{"acme": {{"concurrency": 25}}}}')
    out = {}
    for resource, spec in data.items():
        here = f"{where}[{resource!r}]"
        if not isinstance(spec, dict):
            raise ConfigError(f"{here} must be an object with concurrency, rate, adaptive")
        unknown = set(spec) - {"concurrency", "rate", "adaptive"}
        if unknown:
            raise ConfigError(f"{here}: unknown field(s) {', '.join(sorted(unknown))}; use concurrency, rate, adaptive")
        conc = spec.get("concurrency", 1)
        if isinstance(conc, bool) or not isinstance(conc, int) or not 1 <= conc <= MAX_CONCURRENCY:
            raise ConfigError(f"{here}: concurrency must be a whole number from 1 to {MAX_CONCURRENCY}, got {conc!r}")
        adaptive = spec.get("adaptive", False)
        if not isinstance(adaptive, bool):
            raise ConfigError(f"{here}: adaptive must be true or false, got {adaptive!r}")
        out[resource] = Limit(conc, parse_rate(spec.get("rate"), here), adaptive)
    return out


def limit_for(limits: dict[str, Limit], resource: str) -> Limit:
    return limits.get(resource, Limit())
