"""The OpenAPI 3.0 description of hbs's HTTP API, served at ``/selfupgrade/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

__all__ = ["OPENAPI"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ref("Error"), "Invalid input; `field` names it"),
    "401": _json(_ref("Error"), "A bearer token is required"),
    "403": _json(_ref("Error"), "Admin routes answer only local callers"),
    "413": _json(_ref("Error"), "Body too large"),
}
_VERSION = {"type": "string", "minLength": 1, "maxLength": 64, "example": "6.0.1"}
_MD5 = {"type": "string", "pattern": "^[0-9a-fA-F]{32}$"}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["msg", "error"],
        "properties": {
            "msg": {"type": "string", "enum": ["error"]},
            "error": {"type": "string"},
            "field": {"type": "string"},
        },
    },
    "Heartbeat": {
        "type": "object",
        "required": ["host", "version"],
        "properties": {
            "host": {"type": "string", "minLength": 1, "maxLength": 255},
            "version": _VERSION,
            "state": {
                "type": "string",
                "enum": [
                    "idle",
                    "downloading",
                    "verifying",
                    "installing",
                    "restarting",
                    "confirming",
                    "failed",
                    "rolled_back",
                ],
            },
            "error": {"type": "string", "nullable": True},
            "task_id": {"type": "string", "maxLength": 128},
            "failed_version": {"type": "string", "nullable": True},
            "failures": {"type": "integer", "minimum": 0},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "files": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                },
            },
            "confirmed": {"type": "boolean"},
            "served_by": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "role -> the URL its file came from, in the upgrade under way",
            },
        },
    },
    "Artifact": {
        "type": "object",
        "required": ["url", "digest"],
        "properties": {
            "url": {"type": "string", "format": "uri"},
            "digest": {"type": "string", "example": "sha256:9f86d08..."},
            "size": {"type": "integer", "minimum": 0},
            "target": {"type": "string"},
            "mode": {"type": "integer", "minimum": 0, "maximum": 511},
            "mirrors": {
                "type": "array",
                "items": {"type": "string", "format": "uri"},
                "maxItems": 16,
                "description": "more URLs of the same bytes, tried in order after url",
            },
            "patches": {
                "type": "array",
                "items": _ref("Patch"),
                "maxItems": 16,
                "description": "zstd patch-from deltas from earlier versions to these bytes",
            },
        },
    },
    "Patch": {
        "type": "object",
        "required": ["from", "url", "digest"],
        "additionalProperties": False,
        "properties": {
            "from": _VERSION,
            "url": {"type": "string", "format": "uri"},
            "digest": {"type": "string", "example": "sha256:9f86d08..."},
            "size": {"type": "integer", "minimum": 0},
        },
    },
    "Release": {
        "type": "object",
        "required": ["version", "artifacts"],
        "properties": {
            "version": _VERSION,
            "artifacts": {
                "type": "object",
                "properties": {r: _ref("Artifact") for r in ("bin", "cfg", "service")},
                "additionalProperties": False,
            },
        },
    },
    "Order": {
        "allOf": [
            _ref("Release"),
            {
                "type": "object",
                "properties": {
                    "task_id": {"type": "string"},
                    "allow_downgrade": {"type": "boolean"},
                    "rollback": {"type": "boolean"},
                    "manifest": {"type": "string"},
                },
            },
        ]
    },
    "HeartbeatReply": {
        "type": "object",
        "required": ["order"],
        "properties": {
            "order": {"allOf": [_ref("Order")], "nullable": True},
            "next_beat_s": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "When to beat next, in seconds (only when hbs paces "
                "check-ins); without it, at the agent's own interval.",
            },
        },
    },
    "SeedUpgrade": {
        "type": "object",
        "required": ["wgeturl", "version"],
        "properties": {
            "wgeturl": {"type": "string", "format": "uri"},
            "version": _VERSION,
            "binfile_md5": _MD5,
            "cfgfile_md5": _MD5,
            "type": {"type": "integer", "enum": [0, 1, 2]},
            "allow_downgrade": {"type": "boolean"},
        },
    },
    "SeedReply": {
        "type": "object",
        "required": ["msg", "data"],
        "properties": {"msg": {"type": "string", "enum": ["success"]}, "data": {}},
    },
    "Wave": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 64},
            "hosts": {"type": "integer", "minimum": 1},
            "percent": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 100},
            "max_in_flight": {"type": "integer", "minimum": 1},
            "bake_s": {"type": "number", "minimum": 0, "maximum": 604800},
            "max_failures": {"type": "integer", "minimum": 0},
            "max_failure_ratio": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "additionalProperties": False,
    },
    "Window": {
        "type": "object",
        "required": ["days", "start", "end"],
        "properties": {
            "days": {
                "type": "array",
                "items": {
                    "type": "string",
                    "enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                },
            },
            "start": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"},
            "end": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"},
            "tz": {"type": "string", "example": "Asia/Shanghai"},
        },
        "additionalProperties": False,
    },
    "Plan": {
        "type": "object",
        "required": ["waves"],
        "properties": {
            "waves": {"type": "array", "minItems": 1, "maxItems": 20, "items": _ref("Wave")},
            "selector": {"type": "object", "additionalProperties": {"type": "string"}},
            "window": {"allOf": [_ref("Window")], "nullable": True},
            "mirrors": {"type": "array", "maxItems": 64, "items": _ref("MirrorRule")},
        },
        "additionalProperties": False,
    },
    "MirrorRule": {
        "type": "object",
        "required": ["artifacts"],
        "description": "download sources tried first by the hosts it matches (match and/or "
        "wave); the first matching rule wins",
        "properties": {
            "match": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "labels a host must have",
            },
            "wave": {
                "type": "string",
                "description": "a wave's name: the rule applies while the rollout is on it",
            },
            "artifacts": {
                "type": "object",
                "properties": {
                    r: {
                        "type": "array",
                        "items": {"type": "string", "format": "uri"},
                        "minItems": 1,
                        "maxItems": 16,
                    }
                    for r in ("bin", "cfg", "service")
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    "RolloutCreate": {
        "type": "object",
        "required": ["plan"],
        "properties": {
            "release": _ref("Release"),
            "plan": _ref("Plan"),
            "limits": {
                "type": "object",
                "properties": {
                    "lease_s": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
                    "max_attempts": {"type": "integer", "minimum": 1},
                    "retry_backoff_s": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
                },
                "additionalProperties": False,
            },
            "allow_downgrade": {"type": "boolean"},
            "wgeturl": {"type": "string"},
            "version": _VERSION,
            "binfile_md5": _MD5,
            "cfgfile_md5": _MD5,
            "type": {"type": "integer", "enum": [0, 1, 2]},
        },
        "additionalProperties": False,
    },
    "Rollout": {
        "type": "object",
        "required": ["task", "status", "waves"],
        "properties": {
            "task": {"type": "object"},
            "status": {
                "type": "string",
                "enum": ["active", "paused", "halted", "aborted", "complete", "cancelled"],
            },
            "halt_reason": {"type": "string"},
            "wave": {"type": "integer"},
            "waves": {"type": "array", "items": {"type": "object"}},
            "failures_list": {"type": "array", "items": {"type": "object"}},
            "eta_s": {"type": "number", "nullable": True},
        },
    },
    "RolloutAction": {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "maxLength": 500},
            "mark_bad": {"type": "boolean"},
            "release": _ref("Release"),
        },
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "selfupgrade hbs",
        "version": "1",
        "description": "Heartbeats, the falcon upgrade API, and staged rollouts.",
    },
    "paths": {
        "/selfupgrade/v1/heartbeat": {
            "post": {
                "summary": "An agent's heartbeat; the reply carries its order, if any.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Heartbeat")}},
                },
                "responses": {"200": _json(_ref("HeartbeatReply")), **_ERRORS},
            }
        },
        "/agent/upgrade": {
            "post": {
                "summary": "Publish an upgrade to every host (the falcon API). Admin.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SeedUpgrade")}},
                },
                "responses": {"200": _json(_ref("SeedReply")), **_ERRORS},
            },
            "delete": {
                "summary": "Cancel the upgrade and free its slots. Admin.",
                "responses": {"200": _json(_ref("SeedReply")), **_ERRORS},
            },
        },
        "/agent/upgrade/nowargs": {
            "get": {
                "summary": "The current upgrade, in the falcon API's form.",
                "responses": {"200": _json(_ref("SeedReply"))},
            }
        },
        "/agentversions": {
            "get": {"summary": "Host -> version.", "responses": {"200": _json(_ref("SeedReply"))}}
        },
        "/agents": {
            "get": {"summary": "Hosts seen.", "responses": {"200": _json(_ref("SeedReply"))}}
        },
        "/selfupgrade/v1/status": {
            "get": {
                "summary": "The active rollout's counters, its failed hosts with reasons, and the "
                "fleet by version/state.",
                "responses": {"200": _json({"type": "object"})},
            }
        },
        "/selfupgrade/v1/rollouts": {
            "get": {
                "summary": "Every rollout, newest first.",
                "responses": {"200": _json({"type": "object"})},
            },
            "post": {
                "summary": "Start a staged rollout. Admin.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("RolloutCreate")}},
                },
                "responses": {"201": _json(_ref("Rollout"), "Started"), **_ERRORS},
            },
        },
        "/selfupgrade/v1/rollouts/{id}": {
            "get": {
                "summary": "One rollout: waves, counts by state, failures, ETA.",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _json(_ref("Rollout")),
                    "404": _json(_ref("Error"), "No such rollout"),
                },
            }
        },
        "/selfupgrade/v1/rollouts/{id}/{action}": {
            "post": {
                "summary": "pause, resume, abort, or rollback a rollout. Admin.",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {
                            "type": "string",
                            "enum": ["pause", "resume", "abort", "rollback"],
                        },
                    },
                ],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("RolloutAction")}},
                },
                "responses": {
                    "200": _json(_ref("Rollout")),
                    "201": _json(_ref("Rollout"), "The rollback rollout started"),
                    "404": _json(_ref("Error"), "No such rollout"),
                    "409": _json(_ref("Error"), "Not allowed in the rollout's status"),
                    **_ERRORS,
                },
            }
        },
        "/selfupgrade/v1/versions/bad": {
            "get": {
                "summary": "Versions marked bad.",
                "responses": {"200": _json({"type": "object"})},
            },
            "post": {
                "summary": "Mark a version bad: no later rollout may install it. Admin.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["version"],
                                "properties": {"version": _VERSION, "reason": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {"200": _json({"type": "object"}), **_ERRORS},
            },
        },
        "/selfupgrade/v1/hosts/{host}/rebind": {
            "post": {
                "summary": "Unbind a host from the address it was first heard from (it moved); "
                "its next heartbeat binds it again. Admin.",
                "parameters": [
                    {"name": "host", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _json({"type": "object"}), **_ERRORS},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics.",
                "responses": {"200": {"description": "text exposition"}},
            }
        },
        "/health": {"get": {"summary": "Liveness.", "responses": {"200": {"description": "ok"}}}},
    },
    "components": {"schemas": _SCHEMAS},
}
