"""The intake's one error: an HTTP status with a message that says what to fix."""
from __future__ import annotations

import math

from onelane.core.errors import OnelaneError


class IntakeError(OnelaneError):
    """Raised when a request to the intake cannot be served; answered as JSON ``{"error": ..., "field"?}``.

    ``retry_after_s`` becomes a ``Retry-After`` header (whole seconds, at least 1).
    """

    def __init__(self, status: int, error: str, *, field: str | None = None, retry_after_s: float | None = None,
                 headers: dict | None = None):
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))

    def body(self) -> dict:
        out = {"error": self.error}
        if self.field is not None:
            out["field"] = self.field
        return out
