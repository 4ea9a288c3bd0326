"""Starting the intake: the checks that keep it from running open, then uvicorn.

Guarantees: without ONELANE_INTAKE_TOKENS_FILE the intake binds to loopback only (anyone who
reaches it could make the workers call APIs); a tokens file that is missing or malformed stops
it at start-up with a message naming the setting. A Redis that is down does not stop it: it
answers 503 until Redis is back (``/readyz`` says when).
"""
from __future__ import annotations

import copy
import ipaddress
import logging
import logging.config
import socket

import redis
import uvicorn

from onelane.core.clients import client_for, connect_hint, redact_url
from onelane.core.errors import ConfigError
from onelane.core.settings import Settings, get_settings
from onelane.ops.intake.tokens import SETTING, TokensFile

log = logging.getLogger(__name__)

APP_FACTORY = "onelane.ops.intake.app:create_app"


def is_loopback_host(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_start(host: str, s: Settings) -> str:
    """Refuse to start open beyond loopback; load the tokens file once. Returns a line for the log."""
    if not s.intake_tokens_file:
        if not is_loopback_host(host):
            raise ConfigError(
                f"the intake refuses to listen on {host} without {SETTING}: anyone who reaches it could make your "
                f"workers call APIs. Make a token (`onelane intake token add --lane LANE --file /path/tokens.json`) "
                f"and set {SETTING}=/path/tokens.json — or listen on 127.0.0.1")
        return f"no {SETTING}: every request is allowed, on loopback only"
    book = TokensFile(s.intake_tokens_file).load()
    if len(book) == 0:
        return f"{SETTING}={s.intake_tokens_file} holds no token yet: every request gets 401 until one is added"
    return f"{len(book)} token(s) from {s.intake_tokens_file} (re-read when the file changes)"


def log_config(level: str = "INFO") -> dict:
    """uvicorn's logging, with onelane's loggers beside its own (also in each worker process)."""
    cfg = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    cfg["loggers"]["onelane"] = {"handlers": ["default"], "level": level, "propagate": False}
    return cfg


def serve(host: str, port: int, *, workers: int = 1, access_log: bool = True, settings: Settings | None = None) -> None:
    s = settings or get_settings()
    how = check_start(host, s)
    logging.config.dictConfig(log_config())
    log.info("onelane: intake on http://%s:%d (%d worker(s)); %s", host, port, workers, how)
    if not s.intake_tokens_file:
        log.warning("onelane: the intake runs without tokens (%s unset): fine for a laptop, never for a server",
                    SETTING)
    try:
        client_for(s).ping()
    except redis.RedisError as exc:
        log.warning("onelane: Redis at %s does not answer yet (%s); the intake answers 503 until it does. %s",
                    redact_url(s.redis_url), exc, connect_hint(exc))
    uvicorn.run(APP_FACTORY, factory=True, host=host, port=port, workers=workers, access_log=access_log,
                log_config=log_config(), server_header=False, timeout_graceful_shutdown=10)

