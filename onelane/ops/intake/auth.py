"""Who may do what at the intake: the bearer token (401), its lanes (403), its rate (429).

The rate is a GCRA in Redis — the very script of the resources' global rate limiter
(``onelane/coordination/lua/rate_acquire.lua``) on a key of the token's own — so it holds
across every intake process and host. A token may burst one second's worth of requests, then
keeps to its rate; a batch request counts as one request.
"""
from __future__ import annotations

from onelane.core.keys import Keys
from onelane.core.scripts import LuaScript
from onelane.ops.intake.errors import IntakeError
from onelane.ops.intake.tokens import OPEN, TokenEntry, TokensFile, is_lane

_RATE = LuaScript("onelane.coordination", "rate_acquire")

#: longer Authorization values are not looked up (a token is 47 characters)
MAX_TOKEN_LENGTH = 512
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="onelane intake"'}
HOW_TO = "make one with `onelane intake token add --lane LANE`"


class Auth:
    """Checks requests against the tokens file; with ``tokens=None`` (loopback only) everyone may do anything."""

    def __init__(self, tokens: TokensFile | None, client, keys: Keys):
        self.tokens = tokens
        self.client = client
        self.keys = keys

    @property
    def open(self) -> bool:
        return self.tokens is None

    def identify(self, authorization: str | None) -> TokenEntry:
        """The token's entry; IntakeError 401 when it is missing, malformed or unknown (no Redis involved)."""
        if self.tokens is None:
            return OPEN
        if not authorization:
            raise IntakeError(401, f"no token: send the header 'Authorization: Bearer <token>' ({HOW_TO})",
                              headers=CHALLENGE)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise IntakeError(401, "the Authorization header must be 'Bearer <token>'", headers=CHALLENGE)
        entry = self.tokens.book().find(token) if len(token) <= MAX_TOKEN_LENGTH else None
        if entry is None:
            raise IntakeError(401, f"unknown token (mistyped, or revoked); {HOW_TO}", headers=CHALLENGE)
        return entry

    @staticmethod
    def check_lane(entry: TokenEntry, lane: str) -> None:
        """IntakeError 422 for a malformed lane name, 403 for a lane the token may not use."""
        if not is_lane(lane):
            raise IntakeError(422, f"lane {lane[:120]!r} is not a lane name: 1-100 letters, digits, '_', '.' or '-', "
                                   "starting with a letter or digit", field="lane")
        if not entry.allows(lane):
            raise IntakeError(403, f"token {entry.name!r} may not use lane {lane!r} (it may use: "
                                   f"{', '.join(sorted(entry.lanes))}); use a token made with --lane {lane}")

    def charge(self, entry: TokenEntry) -> None:
        """Count one request against the token's rate; IntakeError 429 with Retry-After when it is over."""
        if entry.rate_per_s is None:
            return
        interval_ms = 1000.0 / entry.rate_per_s
        burst_ms = interval_ms * max(0.0, entry.rate_per_s - 1)  # one second's worth at once
        wait_ms = int(_RATE(self.client, keys=[self.keys.intake_rate(entry.id)], args=[interval_ms, burst_ms]))
        if wait_ms > 0:
            raise IntakeError(429, f"token {entry.name!r} is over its rate of {entry.rate}; retry after "
                                   f"{wait_ms / 1000:.3g} s (see Retry-After)", retry_after_s=wait_ms / 1000)
