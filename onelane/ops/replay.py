"""Replaying a dead letter: what to publish again, and when to refuse (pure logic).

A dead letter keeps its request with secrets masked ("***"). Publishing that request as
it is would send the mask as the secret. So a masked header is either supplied by the
worker-side credentials of the callout's resource (the worker merges those at call time:
the masked copy is left out), or given anew by the operator (``--header``), or the replay
of that entry is refused, naming what is missing and how to supply it.
"""
from __future__ import annotations

from dataclasses import dataclass

from onelane.core.redaction import MASK

#: dead letters of these kinds never reached the API and cannot run as they are
NOT_REPLAYABLE = {"invalid": "it was rejected as invalid input"}


@dataclass(frozen=True)
class ReplayPlan:
    """The callout arguments to publish, or why this dead letter is not replayed."""

    kwargs: dict | None
    refused: str | None = None
    #: masked headers the worker's credentials file will supply
    from_credentials: tuple = ()
    #: masked headers the operator supplied
    supplied: tuple = ()


def parse_header_options(values) -> dict[str, str]:
    """``--header "Name: value"`` options as a mapping; ValueError naming a malformed one."""
    out = {}
    for raw in values or ():
        name, sep, value = raw.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise ValueError(f"--header {raw!r} must look like 'Name: value'")
        out[name.strip()] = value.strip()
    return out


def plan_replay(entry: dict, *, queue: str, credentials: dict[str, str], supplied: dict[str, str]) -> ReplayPlan:
    """What to publish for ``entry``: its request, with every masked header resolved, or a refusal.

    ``credentials`` are the worker-side headers of the entry's resource; ``supplied`` the
    operator's ``--header`` values. The idempotency key stays the original task id's unless
    the request named its own, so an API that saw the first attempts can tell a replay.
    """
    kind = entry.get("kind", "")
    if kind in NOT_REPLAYABLE:
        return ReplayPlan(None, f"{NOT_REPLAYABLE[kind]} ({entry.get('reason', '')}); fix it and submit it anew")
    request = entry.get("request")
    if not isinstance(request, dict) or "url" not in request:
        return ReplayPlan(None, "its request was not kept (too large, or not JSON); submit it anew")
    kwargs = dict(request)
    if f"{MASK}@" in str(kwargs.get("url", "")):
        return ReplayPlan(None, "its URL had a user name or password, masked when stored; submit it anew "
                                "without them and put the credentials in ONELANE_CREDENTIALS_FILE")
    headers = dict(kwargs.get("headers") or {})
    creds = {k.lower() for k in credentials}
    given = {k.lower(): (k, v) for k, v in supplied.items()}
    missing, from_creds, from_operator = [], [], []
    for name, value in list(headers.items()):
        if value != MASK:
            continue
        if name.lower() in given:
            headers[name] = given[name.lower()][1]
            from_operator.append(name)
        elif name.lower() in creds:
            del headers[name]  # the worker merges the real value at call time
            from_creds.append(name)
        else:
            missing.append(name)
    present = {k.lower() for k in headers}
    for low, (name, value) in given.items():
        if low not in present:
            headers[name] = value  # an extra header the operator asked for
            from_operator.append(name)
    if missing:
        resource = kwargs.get("resource") or queue
        names = ", ".join(missing)
        example = " ".join(f"--header '{n}: ...'" for n in missing)
        return ReplayPlan(None, f"header(s) {names} were masked when it was dead-lettered; supply them with "
                                f"{example}, or put them in ONELANE_CREDENTIALS_FILE for resource {resource!r}")
    if headers:
        kwargs["headers"] = headers
    else:
        kwargs.pop("headers", None)
    kwargs.setdefault("idempotency_key", entry.get("task_id"))
    return ReplayPlan(kwargs, None, tuple(from_creds), tuple(from_operator))
