"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json.

Written by hand (the API is small and its streaming routes are not what generators describe well) and kept in
step with the routes by tests/test_python_api.py, which compares paths and methods with the app's routes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OPENAPI"]

_ERROR = {"$ref": "#/components/schemas/Error"}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


_AUTH = {"401": _err("Missing, malformed or expired token (private channel)"),
         "403": _err("Token without a grant for this channel, or the authorization hook refused (`denied`)")}
_HOOK_DOWN = _err("The authorization hook (or the publish hook) gave no usable answer: `auth_hook_timeout`, "
                  "`auth_hook_unreachable`, `auth_hook_invalid`, `auth_hook_busy` (`publish_hook_*`); nothing was "
                  "done, retry after Retry-After. A stream gets 200 with `relay.unavailable` and `retry:` instead")
_LIMITED = {"429": _err("Over the client's publish rate or stream count (Retry-After)"),
            "431": _err("Headers over MAX_HEADER_BYTES")}

_CHANNEL = {"name": "channel", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"}}
_LAST_ID = [
    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "Resume after this id (browsers send it on reconnect)."},
    {"name": "last_event_id", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "Resume on a first connect; `0` replays all retained history. The header wins."},
]
_STREAM = {"description": "An endless text/event-stream: `retry:`, a `relay.hello` event whose `id:` is the "
                          "stream's position (resume from it to miss nothing), then messages (`id:`, `event:` when "
                          "named, `data:` JSON) and heartbeat comments. `relay.reset` tells the client its id "
                          "could not be honoured (expired, another epoch, future, malformed) and that retained "
                          "history follows; `relay.ended` that the service ended it (`reason`). A stream the "
                          "authorization hook could not decide on gets `relay.unavailable` and `retry:`, then ends.",
           "content": {"text/event-stream": {"schema": {"type": "string"}}}}
_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"},
                "description": "A retry with the same key (within IDEMPOTENCY_TTL) returns the first publish's id "
                               "instead of publishing again (`duplicate: true`)."}
_BROKER_ERRORS = {"503": _err("Not published: broker unavailable (`unavailable`), Redis loading its data after a "
                              "restart (`loading`) or out of connections (`busy`), or a hook gave no usable answer "
                              "(`auth_hook_*`, `publish_hook_*`); retry after Retry-After"),
                  "504": _err("Outcome unknown (`outcome_unknown`): retry with the same Idempotency-Key")}
_PUBLISH_BODY = {"type": "object", "required": ["data"], "additionalProperties": False,
                 "properties": {"data": {"description": "Any JSON value"},
                                "event": {"type": "string", "pattern": "^[A-Za-z0-9_.:/-]{1,64}$"}}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "sse-relay", "version": "0.1.0",
             "description": "Redis-backed, horizontally scalable Server-Sent Events relay."},
    "paths": {
        "/channels/{channel}/messages": {"post": {
            "summary": "Publish one message", "parameters": [_CHANNEL, _IDEMPOTENCY],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _PUBLISH_BODY}}},
            "responses": {"202": {"description": "Accepted", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"id": {"type": "string"}, "channel": {"type": "string"},
                                                 "duplicate": {"type": "boolean"}}}}}},
                "400": _err("Malformed JSON, channel name or Idempotency-Key"),
                "413": _err("Body over MAX_MESSAGE_BYTES"), "422": _err("Body of the wrong shape"),
                **_BROKER_ERRORS, **_AUTH, **_LIMITED}}},
        "/channels/{channel}/events": {"get": {
            "summary": "Stream one channel", "parameters": [_CHANNEL, *_LAST_ID],
            "responses": {"200": _STREAM, "400": _err("Invalid channel name"), **_AUTH, **_LIMITED}}},
        "/channels/{channel}": {"get": {
            "summary": "Presence and newest id of a channel", "parameters": [_CHANNEL],
            "responses": {"200": {"description": "Channel info", "content": {"application/json": {"schema": {
                "type": "object", "properties": {
                    "channel": {"type": "string"}, "subscribers": {"type": "integer"},
                    "instances": {"type": "integer"}, "last_id": {"type": ["string", "null"]}}}}}},
                **_BROKER_ERRORS, **_AUTH}}},
        "/events": {"get": {
            "summary": "Stream several channels on one connection",
            "parameters": [{"name": "channel", "in": "query", "required": True, "style": "form", "explode": True,
                            "schema": {"type": "array", "items": {"type": "string"}}}, *_LAST_ID],
            "responses": {"200": _STREAM, "400": _err("No, too many or invalid channels"), **_AUTH, **_LIMITED}}},
        "/publish": {"post": {
            "summary": "Publish a batch to one or several channels",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["messages"], "properties": {"messages": {"type": "array", "items": {
                    "type": "object", "required": ["channel", "data"],
                    "properties": {"channel": {"type": "string"}, "data": {}, "event": {"type": "string"},
                                   "idempotency_key": {"type": "string"}}}}}}}}},
            "responses": {"200": {"description": "Per-item results (id or error), in request order"},
                          "413": _err("Too many items (MAX_BATCH)"), "422": _err("Body of the wrong shape"),
                          **_AUTH, **_LIMITED}}},
        "/server/send": {"post": {
            "summary": "The old chat's publish: {messages: [{role, content}]} to the default channel",
            "parameters": [_IDEMPOTENCY],
            "responses": {"200": {"description": '{"status": "Message received successfully"}'},
                          "422": _err("Missing or empty messages"), **_BROKER_ERRORS}}},
        "/server/events": {"get": {"summary": "The old chat's stream of the default channel; `chat` events of the "
                                              "page arrive in the old form, [{role, content}]",
                                   "parameters": _LAST_ID, "responses": {"200": _STREAM}}},
        "/admin/end": {"post": {
            "summary": "End the streams of a user, of a channel, or of a user on a channel, on every replica "
                       "(`relay.ended` with the reason); their remembered hook decisions are dropped everywhere",
            "security": [{"admin": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"user": {"type": "string"}, "channel": {"type": "string"},
                               "reason": {"type": "string", "maxLength": 200}}}}}},
            "responses": {"202": {"description": "Ended here; sent to the other replicas", "content": {
                "application/json": {"schema": {"type": "object", "properties": {
                    "user": {"type": ["string", "null"]}, "channel": {"type": ["string", "null"]},
                    "reason": {"type": "string"}, "ended_here": {"type": "integer"}}}}}},
                "401": _err("No or wrong ADMIN_API_KEY, or the admin API is closed (no key configured)"),
                "422": _err("Neither user nor channel, or fields of the wrong shape"),
                "503": _err("Ended here, but the other replicas could not be told (broker unavailable)")}}},
        "/healthz": {"get": {"summary": "Alive", "responses": {"200": {"description": "Alive"}}}},
        "/readyz": {"get": {"summary": "Ready to serve streams (started, not draining, not full); not whether "
                                       "the shared broker answers, so its outage never empties a load balancer",
                            "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}}}},
        "/healthz/broker": {"get": {"summary": "Does this instance reach its broker (for alerts)",
                                    "responses": {"200": {"description": "Up"}, "503": {"description": "Down"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "Metrics"}}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}},
        "/": {"get": {"summary": "The chat page", "responses": {"200": {"description": "HTML"}}}},
    },
    "security": [{}, {"bearer": []}, {"cookie": []}],
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                       "description": 'Claim "sse": {"publish": [globs], "subscribe": [globs]}; '
                                      "public channels need none"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": "sse_token",
                       "description": "The same JWT for EventSource, which cannot set headers (AUTH_COOKIE)"},
            "admin": {"type": "http", "scheme": "bearer", "description": "ADMIN_API_KEY, for /admin/*"},
        },
        "schemas": {"Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }},
        }},
    },
}
