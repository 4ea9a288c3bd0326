"""The intake's OpenAPI document (served at ``/openapi.json``), written out by hand.

Hand-written rather than derived from models, because the intake validates with onelane's own
rules (:func:`onelane.callout.validation.validate`), which a JSON schema can only approximate:
the schemas below describe shapes and limits; the server's answer (422 naming the field) is
the final word. ``tests/test_intake.py`` fuzzes the server against this document.
"""
from __future__ import annotations

from onelane.callout.validation import (ARGUMENTS, MAX_HEADER_NAME, MAX_HEADER_VALUE, MAX_HEADERS, MAX_KEY_LENGTH,
                                        MAX_RESOURCE_LENGTH, METHODS)
from onelane.core.settings import MAX_CALLOUT_TIMEOUT_S, Settings
from onelane.delivery.coalescing import MAX_COALESCE_KEY
from onelane.ops.intake.state import STATES
from onelane.ops.intake.tokens import LANE_RE

VERSION = "1"

#: header names: an RFC 9110 token; values and keys: printable Latin-1, no line breaks (what HTTP can carry)
_TOKEN = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
_LATIN1 = "^[\\t\\x20-\\x7e\\xa0-\\xff]*$"

_ARGUMENT_SCHEMAS = {
    "url": {"type": "string", "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://",
            "description": "http:// or https:// URL with a host (required)",
            "examples": ["https://api.example.com/orders"]},
    "method": {"type": "string", "enum": [*METHODS, *(m.lower() for m in METHODS)],
               "description": f"one of {', '.join(METHODS)}, any case; default POST"},
    "json": {"description": "the request's JSON body: any JSON value; not together with data"},
    "data": {"description": "a form body: a string, or an object of strings; not together with json",
             "oneOf": [{"type": "string"}, {"type": "object", "additionalProperties": {"type": "string"}}]},
    "headers": {"type": "object", "maxProperties": MAX_HEADERS,
                "propertyNames": {"pattern": _TOKEN, "maxLength": MAX_HEADER_NAME},
                "additionalProperties": {"type": "string", "pattern": _LATIN1, "maxLength": MAX_HEADER_VALUE},
                "description": "request headers; Idempotency-Key and X-Fencing-Token are set by onelane"},
    "params": {"type": "object", "description": "query parameters: strings, numbers or lists of them",
               "additionalProperties": {"oneOf": [
                   {"type": "string"}, {"type": "number"},
                   {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "number"}]}}]}},
    "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_CALLOUT_TIMEOUT_S,
                "description": "hard total deadline of one HTTP attempt, seconds; default ONELANE_CALLOUT_TIMEOUT"},
    "resource": {"type": "string", "minLength": 1, "maxLength": MAX_RESOURCE_LENGTH, "pattern": "^\\S+$",
                 "description": "the lease key: callouts with the same resource never overlap; default the lane"},
    "idempotency_key": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": _LATIN1,
                        "description": "sent as the callout's Idempotency-Key; same as the request header "
                                       "(give one of them); default the task id"},
    "retry_on": {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 599},
                 "description": "the HTTP statuses to retry for this callout; default ONELANE_RETRY_STATUSES"},
    "coalesce_key": {"type": "string", "minLength": 1, "maxLength": MAX_COALESCE_KEY,
                     "description": "a record's key: while a callout with this key waits in its lane, a newer one "
                                    "replaces its arguments (one call, the newest data; see the README's Coalescing)"},
}


def _callout_schema() -> dict:
    props = {name: _ARGUMENT_SCHEMAS.get(name, {"description": f"the tasks.callout argument {name}"})
             for name in ARGUMENTS}
    return {"type": "object", "required": ["url"], "additionalProperties": False, "properties": props,
            "description": "the keyword arguments of tasks.callout, checked exactly as onelane.submit() checks them",
            "examples": [{"url": "https://api.example.com/orders", "json": {"order": 42}}]}


def _error(description: str, *, retry_after: bool = False, challenge: bool = False) -> dict:
    out = {"description": description,
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    headers = {}
    if retry_after:
        headers["Retry-After"] = {"required": True, "description": "seconds to wait before trying again",
                                  "schema": {"type": "string", "pattern": "^[0-9]+$"}}
    if challenge:
        headers["WWW-Authenticate"] = {"required": True, "schema": {"type": "string"}}
    if headers:
        out["headers"] = headers
    return out


def _json(ref: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


_AUTH_ERRORS = {
    "401": _error("no token, a malformed Authorization header, or an unknown token", challenge=True),
    "429": _error("the token is over its rate", retry_after=True),
    "503": _error("Redis is unreachable or refusing; nothing was done", retry_after=True),
}
_BODY_ERRORS = {
    "400": _error("the body is not JSON"),
    "403": _error("the token may not use this lane"),
    "404": _error("no such endpoint (for example a lane with a '/')"),
    "409": _error("a request with the same Idempotency-Key on this lane is being accepted right now",
                  retry_after=True),
    "413": _error("the body, or a callout, is larger than allowed"),
    "415": _error("the body is not sent as application/json"),
    "422": _error("a callout argument, the lane or the Idempotency-Key is wrong (field names which), or the "
                  "Idempotency-Key was used for a different callout"),
}

_LANE = {"name": "lane", "in": "path", "required": True, "example": "erp",
         "description": "the lane (queue) to publish to: one serial queue per integration",
         "schema": {"type": "string", "pattern": LANE_RE.pattern}}
_IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                    "description": "the same key on the same lane within ONELANE_DEDUPE_WINDOW returns the first "
                                   "task's id (200) and publishes nothing; it is also the callout's idempotency_key",
                    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": _LATIN1}}


def document(settings: Settings) -> dict:
    """The OpenAPI 3.1 document of the intake under ``settings`` (its batch and size limits)."""
    nullable_str = {"type": ["string", "null"]}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "onelane intake", "version": VERSION,
            "description": (
                "Hand callouts to onelane's lanes with one quick HTTP request; onelane makes the slow, serial, "
                "exactly-once call to the fragile API and tells how it went. Authenticate with "
                "'Authorization: Bearer <token>' (tokens: `onelane intake token add --lane LANE`). Every answer "
                "is JSON with an 'error' field (null on success) that says what to fix."),
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/lanes/{lane}/callouts": {"post": {
                "operationId": "postCallout", "summary": "Accept one callout for a lane",
                "parameters": [_LANE, _IDEMPOTENCY_KEY],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Callout"}}},
                    "description": f"at most ONELANE_MAX_MESSAGE_BYTES ({settings.max_message_bytes}) bytes"},
                "responses": {
                    "202": {**_json("Accepted", "published to the lane"),
                            "headers": {"Location": {"required": True, "schema": {"type": "string"},
                                                     "description": "the callout's status URL"}}},
                    "200": _json("Accepted", "a duplicate: the first task with this Idempotency-Key; nothing published"),
                    **_AUTH_ERRORS, **_BODY_ERRORS},
            }},
            "/v1/lanes/{lane}/callouts:batch": {"post": {
                "operationId": "postCalloutBatch",
                "summary": "Accept many callouts for a lane, each on its own (one bad callout sinks none)",
                "parameters": [_LANE, {**_IDEMPOTENCY_KEY, "description": (
                    "callout i without an idempotency_key of its own gets '<Idempotency-Key>:<i>', so the whole "
                    "batch can be sent again safely")}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Batch"}}},
                    "description": f"at most ONELANE_INTAKE_MAX_BATCH_BYTES ({settings.intake_max_batch_bytes}) bytes"},
                "responses": {
                    "202": _json("BatchAnswer", "at least one callout was published; items[i] tells each one's fate"),
                    "200": _json("BatchAnswer", "every accepted callout was a duplicate; nothing published"),
                    "422": {"description": "no callout was accepted (items[i].error says why), or the batch itself "
                                           "is malformed",
                            "content": {"application/json": {"schema": {"anyOf": [
                                {"$ref": "#/components/schemas/BatchAnswer"}, {"$ref": "#/components/schemas/Error"}]}}}},
                    **_AUTH_ERRORS, **{k: v for k, v in _BODY_ERRORS.items() if k not in ("422", "409")}},
            }},
            "/v1/callouts/{task_id}": {"get": {
                "operationId": "getCallout", "summary": "How a callout is doing: state, attempts, result",
                "parameters": [{"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"},
                                "description": "the task_id the intake answered"}],
                "responses": {
                    "200": _json("CalloutState", "the callout's state"),
                    "403": _error("the token may not use the callout's lane"),
                    "404": _error("the intake accepted no such callout within ONELANE_DEDUPE_WINDOW"),
                    **_AUTH_ERRORS},
            }},
            "/v1/lanes": {"get": {
                "operationId": "getLanes", "summary": "Every lane the token may use: depth, in flight, holder, "
                                                     "paused, dead letters",
                "responses": {"200": _json("Lanes", "the lanes"), **_AUTH_ERRORS},
            }},
            "/healthz": {"get": {
                "operationId": "healthz", "summary": "The process is up (no Redis involved)", "security": [],
                "responses": {"200": _json("Health", "up")},
            }},
            "/readyz": {"get": {
                "operationId": "readyz", "summary": "Redis is reachable: callouts can be accepted", "security": [],
                "responses": {"200": _json("Health", "ready"),
                              "503": _error("Redis is unreachable or refusing", retry_after=True)},
            }},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "a token from `onelane intake token add --lane LANE`"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "string", "description": "what went wrong and what to do about it"},
                    "field": {**nullable_str, "description": "the argument, header or parameter at fault"}}},
                "Callout": _callout_schema(),
                "Batch": {"type": "object", "required": ["callouts"], "additionalProperties": False, "properties": {
                    "callouts": {"type": "array", "minItems": 1, "maxItems": settings.intake_max_batch,
                                 "items": {"$ref": "#/components/schemas/Callout"}}}},
                "Accepted": {"type": "object", "required": ["task_id", "lane", "status_url", "duplicate", "error"],
                             "properties": {
                                 "task_id": {"type": "string"}, "lane": {"type": "string"},
                                 "status_url": {"type": "string", "description": "GET it for the callout's state"},
                                 "duplicate": {"type": "boolean"}, "error": {"type": "null"}}},
                "BatchItem": {"type": "object", "required": ["index", "status", "error"], "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "status": {"type": "integer", "description": "202 published, 200 duplicate, else the error's"},
                    "task_id": {"type": "string"}, "lane": {"type": "string"}, "status_url": {"type": "string"},
                    "duplicate": {"type": "boolean"}, "error": nullable_str, "field": nullable_str}},
                "BatchAnswer": {"type": "object",
                                "required": ["lane", "accepted", "duplicates", "rejected", "items", "error"],
                                "properties": {
                                    "lane": {"type": "string"}, "accepted": {"type": "integer"},
                                    "duplicates": {"type": "integer"}, "rejected": {"type": "integer"},
                                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/BatchItem"}},
                                    "error": nullable_str}},
                "CalloutState": {"type": "object",
                                 "required": ["task_id", "lane", "state", "attempts", "result", "reason", "error"],
                                 "properties": {
                                     "task_id": {"type": "string"}, "lane": {"type": "string"},
                                     "state": {"type": "string", "enum": list(STATES)},
                                     "attempts": {"type": "integer", "minimum": 0},
                                     "result": {"type": ["object", "null"],
                                                "description": "tasks.callout's result (secrets masked) once it succeeded"},
                                     "reason": {**nullable_str, "description": "why it failed"},
                                     "error": {"type": "null"}}},
                "Lane": {"type": "object", "required": ["name"],
                         "description": "a line of `onelane status` (its JSON form: schema 2)",
                         "properties": {
                             "name": {"type": "string"}, "kind": {"type": "string", "enum": ["lane", "bulk"]},
                             "depth": {"type": "integer"}, "in_flight": {"type": "integer"},
                             "delayed": {"type": "integer"},
                             "holder": {"type": ["object", "null"],
                                        "description": "the worker holding the lane's guard"},
                             "standbys": {"type": "integer"}, "paused": {"type": "boolean"},
                             "dead_letters": {"type": "integer"}, "completed_last_minute": {"type": "integer"},
                             "head_waiting_s": {"type": ["number", "null"]},
                             "outbox": {"type": ["object", "null"]}}},
                "Lanes": {"type": "object", "required": ["lanes", "error"], "properties": {
                    "lanes": {"type": "array", "items": {"$ref": "#/components/schemas/Lane"}},
                    "error": {"type": "null"}}},
                "Health": {"type": "object", "required": ["status", "error"], "properties": {
                    "status": {"type": "string"}, "error": {"type": "null"}}},
            },
        },
    }
