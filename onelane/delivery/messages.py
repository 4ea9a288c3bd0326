"""kombu's Redis message format, read in one place.

A queued message is kombu's JSON envelope (``headers``, ``properties``, ``body``); its
unacked copy is ``[message, exchange, routing_key]`` as JSON. Celery puts the task id in
``headers["id"]`` and the task name in ``headers["task"]``.
"""
from __future__ import annotations

import json

from onelane.core.text import text


def task_id_of(message: dict) -> str | None:
    """The Celery task id of a decoded kombu message, or None if it has none."""
    try:
        return message["headers"]["id"]
    except (KeyError, TypeError):
        return None


def parse_queued(raw) -> dict | None:
    """A queued message (bytes or str) as a dict; None if it is not kombu's JSON envelope."""
    try:
        message = json.loads(text(raw))
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def parse_unacked(raw) -> tuple[dict, str, str] | None:
    """kombu's unacked entry as (message, exchange, routing key); None if unreadable."""
    try:
        message, exchange, routing_key = json.loads(text(raw))
    except (ValueError, TypeError):
        return None
    if not isinstance(message, dict):
        return None
    return message, exchange, routing_key


def mark_redelivered(raw: str) -> str:
    """The unacked entry's message, flagged as redelivered, ready to push back to its queue."""
    message, _exchange, _rk = json.loads(raw)
    message.setdefault("headers", {})["redelivered"] = True
    props = message.setdefault("properties", {})
    props.setdefault("delivery_info", {})["redelivered"] = True
    return json.dumps(message)
