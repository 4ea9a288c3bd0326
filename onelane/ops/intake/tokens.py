"""Intake tokens: bearer tokens kept only as hashes, found in constant time; the tokens file.

The file named by ONELANE_INTAKE_TOKENS_FILE maps each token's hash to what it may do::

    {"sha256:9f2c...": {"name": "erp-prod", "lanes": ["erp"], "rate": "100/s", "created": "2026-11-24T10:00:00Z"}}

``lanes`` lists the lanes the token may publish to and read (``["*"]``: every lane); ``rate``
(optional, ``"100/s"`` or ``"600/m"``) caps its requests across every intake process.

Guarantees: a token is shown once, when :func:`add_token` makes it, and never stored — only its
SHA-256 (a token carries 256 random bits, so a fast hash is enough: nothing to brute-force).
:meth:`TokenBook.find` compares the presented token's hash with every stored hash with
:func:`hmac.compare_digest` and never stops early, so its time says nothing about which
token, or how much of one, matched. The file is written whole (temporary file, then rename),
readable by its owner only.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass

from onelane.core.errors import ConfigError
from onelane.core.limits import parse_rate

log = logging.getLogger(__name__)

#: what a token starts with, so a leaked one is recognisable (secret scanners, logs)
TOKEN_PREFIX = "olk_"
HASH_PREFIX = "sha256:"
ANY_LANE = "*"
#: a lane is a queue name: the rule of ONELANE_QUEUE
LANE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
SETTING = "ONELANE_INTAKE_TOKENS_FILE"
_FIELDS = {"name", "lanes", "rate", "created"}


def is_lane(name: str) -> bool:
    """True when ``name`` is a valid lane (queue) name: 1-100 letters, digits, '_', '.', '-'."""
    return isinstance(name, str) and LANE_RE.match(name) is not None


def new_token() -> str:
    """A fresh token: the prefix and 256 random bits."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return HASH_PREFIX + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    """What one token may do."""

    hash: str
    name: str
    lanes: frozenset
    #: requests per second across every intake process (None: no limit)
    rate_per_s: float | None = None
    #: the rate as written in the file ("100/s"), for messages
    rate: str | None = None
    created: str = ""

    @property
    def id(self) -> str:
        """A short public handle (the first 16 hex digits of the hash): rate keys, logs, revoke."""
        return self.hash[len(HASH_PREFIX):len(HASH_PREFIX) + 16]

    def allows(self, lane: str) -> bool:
        return ANY_LANE in self.lanes or lane in self.lanes

    def to_file(self) -> dict:
        out = {"name": self.name, "lanes": sorted(self.lanes)}
        if self.rate:
            out["rate"] = self.rate
        if self.created:
            out["created"] = self.created
        return out


#: the token of an intake that runs without a tokens file (loopback only): every lane, no rate
OPEN = TokenEntry(hash=HASH_PREFIX, name="(no tokens file: loopback only)", lanes=frozenset({ANY_LANE}))


def parse_book(text: str, where: str = SETTING) -> dict[str, TokenEntry]:
    """Parse a tokens file; raise ConfigError naming the file and the entry at fault."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where} is not valid JSON ({exc}); fix it, or make it with "
                          "`onelane intake token add --lane LANE`") from None
    if not isinstance(data, dict):
        raise ConfigError(f'{where} must map token hashes to entries, e.g. {{"sha256:...": {{"lanes": ["erp"]}}}}')
    out = {}
    for key, spec in data.items():
        here = f"{where}: entry {key[:20]!r}"
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", key):
            raise ConfigError(f"{here} is not a token hash (sha256: and 64 hex digits); never put a token "
                              "itself in the file: `onelane intake token add` writes its hash")
        if not isinstance(spec, dict):
            raise ConfigError(f"{here} must be an object with lanes (and optionally rate, name)")
        unknown = set(spec) - _FIELDS
        if unknown:
            raise ConfigError(f"{here}: unknown field(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(_FIELDS))}")
        lanes = spec.get("lanes")
        if not isinstance(lanes, list) or not lanes or not all(
                isinstance(x, str) and (x == ANY_LANE or is_lane(x)) for x in lanes):
            raise ConfigError(f"{here}: lanes must be a non-empty list of lane names (or \"*\" for every lane), "
                              f"got {lanes!r}")
        rate = spec.get("rate")
        per_s = parse_rate(rate, here) if rate is not None else None
        name = spec.get("name", "")
        if not isinstance(name, str):
            raise ConfigError(f"{here}: name must be a string")
        out[key] = TokenEntry(hash=key, name=name or key[7:23], lanes=frozenset(lanes), rate_per_s=per_s,
                              rate=None if rate is None else str(rate), created=str(spec.get("created", "")))
    return out


class TokenBook:
    """The tokens an intake accepts."""

    def __init__(self, entries: dict[str, TokenEntry]):
        self._entries = tuple(entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, presented: str) -> TokenEntry | None:
        """The entry of the presented token, or None; in constant time (every hash compared, no early exit)."""
        digest = hash_token(presented)
        found = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.hash):
                found = entry
        return found


class _DirLock:
    def __init__(self, directory: str):
        self.directory = directory

    def __enter__(self):
        self.fd = os.open(self.directory, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class TokensFile:
    """The tokens file: read (and re-read when it changes) by the intake, written by the CLI."""

    #: how often the intake looks at the file's modification time
    CHECK_EVERY_S = 1.0

    def __init__(self, path: str):
        self.path = path
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._book = TokenBook({})

    # -- reading (the intake)
    def load(self) -> TokenBook:
        """Read the file now; raise ConfigError when it is missing or malformed."""
        try:
            st = os.stat(self.path)
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"{SETTING}={self.path!r}: no such file; make it with "
                              f"`onelane intake token add --lane LANE --file {self.path}`") from None
        except OSError as exc:
            raise ConfigError(f"{SETTING}={self.path!r} cannot be read ({exc})") from None
        self._book = TokenBook(parse_book(text, f"{SETTING}={self.path!r}"))
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        self._checked = time.monotonic()
        return self._book

    def book(self) -> TokenBook:
        """The current tokens: re-read at most every CHECK_EVERY_S when the file changed.

        A file that became unreadable or malformed keeps the last good tokens (and says so in the log),
        so a half-edited file never locks everyone out or lets anyone in.
        """
        now = time.monotonic()
        if now - self._checked >= self.CHECK_EVERY_S:
            self._checked = now
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp:
                    self.load()
                    log.info("onelane: intake tokens re-read from %s (%d token(s))", self.path, len(self._book))
            except (OSError, ConfigError) as exc:
                log.error("onelane: intake tokens file %s not re-read, keeping the last good one: %s", self.path, exc)
        return self._book

    # -- writing (the CLI)
    def entries(self) -> dict[str, TokenEntry]:
        """Every entry (an absent file has none)."""
        if not os.path.exists(self.path):
            return {}
        with open(self.path, encoding="utf-8") as f:
            return parse_book(f.read(), f"{SETTING}={self.path!r}")

    def _locked(self):
        """Hold an exclusive lock on the file's directory (no lock file left behind) while read-modify-writing."""
        return _DirLock(os.path.dirname(os.path.abspath(self.path)))

    def _write(self, entries: dict[str, TokenEntry]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".tokens-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({h: e.to_file() for h, e in entries.items()}, f, indent=2, sort_keys=True)
                f.write("\n")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def add(self, lanes: list[str], *, rate: str | None = None, name: str = "") -> tuple[str, TokenEntry]:
        """Make a token for ``lanes``, store its hash, and return (the token, its entry). Shown once."""
        bad = [x for x in lanes if x != ANY_LANE and not is_lane(x)]
        if not lanes or bad:
            raise ConfigError(f"lane {bad[0] if bad else ''!r} is not a lane name: 1-100 letters, digits, "
                              "'_', '.' or '-' (or \"*\" for every lane)")
        per_s = parse_rate(rate, "--rate") if rate is not None else None
        token = new_token()
        entry = TokenEntry(hash=hash_token(token), name=name, lanes=frozenset(lanes), rate_per_s=per_s, rate=rate,
                           created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with self._locked():
            entries = self.entries()
            entry = TokenEntry(**{**entry.__dict__, "name": name or entry.id})
            entries[entry.hash] = entry
            self._write(entries)
        return token, entry

    def revoke(self, which: str) -> list[TokenEntry]:
        """Remove the tokens whose name or id is ``which``; return them (empty: nothing matched)."""
        with self._locked():
            entries = self.entries()
            gone = [e for e in entries.values() if which in (e.name, e.id)]
            for e in gone:
                del entries[e.hash]
            if gone:
                self._write(entries)
        return gone
