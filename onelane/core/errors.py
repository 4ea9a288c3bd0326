"""The onelane error tree: every error onelane raises on purpose is an OnelaneError."""
from __future__ import annotations


class OnelaneError(Exception):
    """Root of every error onelane raises on purpose."""


class ConfigError(OnelaneError, ValueError):
    """Raised when a setting is malformed or two settings contradict each other."""


class ValidationError(OnelaneError, ValueError):
    """Raised when a callout's arguments are wrong; ``field`` names the argument."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.reason = message
        super().__init__(f"callout argument {field!r}: {message}")

    def __reduce__(self):  # keep it picklable for the prefork pool
        return (type(self), (self.field, self.reason))


class LeaseError(OnelaneError):
    """Root of the lease errors."""


class LeaseNotHeld(LeaseError):
    """Raised when a renew or release names a token that no longer holds the lease."""


class LeaseBusy(LeaseError):
    """Raised when a lease could not be had within the allowed wait."""


class GuardHeld(OnelaneError):
    """Raised at worker start-up when another live worker consumes the same queue."""


class WorkerMisconfigured(OnelaneError):
    """Raised at worker start-up when the serial queue would not be consumed one at a time."""


class BrokerUnavailable(OnelaneError):
    """Raised when a producer cannot reach Redis after bounded retries."""


class CalloutFailed(OnelaneError):
    """Raised when a callout ends without success and is dead-lettered."""


class CalloutRejected(CalloutFailed):
    """Raised when a callout's input is invalid: it never reached the API and is dead-lettered."""


class UnexpectedReply(OnelaneError):
    """Raised when a Redis script answers in a shape onelane does not know.

    It means the server runs a script of another onelane version under the same name, or
    something else answered on REDIS_URL: restart every onelane process on one version.
    """


class EgressRefused(OnelaneError):
    """Raised when a callout's host is not allowed (allowlist) or resolves to a private address."""
