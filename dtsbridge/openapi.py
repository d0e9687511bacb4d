"""The API as OpenAPI 3.0 (served at ``GET /openapi.json``); tests check it against real answers."""

from __future__ import annotations

from typing import Any

from dtsbridge.model import PUBLIC_FIELDS, FieldType, Status

_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}

STATUSES = [s.value for s in Status]

#: the JSON schema of each type of public job field (the Job schema is :data:`model.PUBLIC_FIELDS`)
_FIELD_SCHEMA: dict[FieldType, dict[str, Any]] = {
    FieldType.STR: _STR,
    FieldType.INT: _INT,
    FieldType.FLOAT: {"type": "number"},
    FieldType.BOOL: {"type": "boolean"},
    FieldType.TIME: {"type": "string", "format": "date-time"},
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}
    if headers:
        out["headers"] = headers
    return out


def _body(schema: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"required": True, "content": {"application/json": {"schema": ref},
                                          "application/x-www-form-urlencoded": {"schema": ref}}}


_COMMON = {
    "401": _error("No token, or an invalid or expired token"),
    "413": _error("The body is larger than 64 KiB"),
    "503": _error("Redis or the authentication service is unavailable, or the service is draining"),
}


_TIMEOUT = {"type": "number", "exclusiveMinimum": True, "minimum": 0,
            "description": "Optional: the job ends in ERROR (reason `timeout`) unless it has ended this many "
                           "seconds after the request"}


def _open_get(summary: str, description: str, media_type: str, schema: dict[str, Any] = _STR) -> dict[str, Any]:
    """A GET that needs no token, answering 200 with one media type."""
    return {"get": {"summary": summary, "security": [],
                    "responses": {"200": {"description": description, "content": {media_type: {"schema": schema}}}}}}


#: What any request may get from the connection layer (``dtsbridge.http``), before its route runs.
_CONNECTION = {
    "408": _error("The request line, headers and body did not all arrive within [server] read_timeout_seconds"),
    "431": _error("A request line or header is too long"),
}


def spec(version: str, staging_max_timeout: float = 604800) -> dict[str, Any]:
    doc = _spec(version, staging_max_timeout)
    for ops in doc["paths"].values():
        for op in ops.values():
            op["responses"].update(_CONNECTION)
    return doc


def _spec(version: str, staging_max_timeout: float) -> dict[str, Any]:
    job_props = {name: _FIELD_SCHEMA[t] for name, t in PUBLIC_FIELDS.items()}
    job_props["status"] = {"type": "string", "enum": STATUSES}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "dtsbridge",
            "version": version,
            "description": "Completes KBase Data Transfer Service transfers: copies a folder of the DTS area "
                           "into a user's datastore, verifies every byte by checksum, gives the files to the "
                           "user and keeps each job's state in Redis.",
        },
        "components": {
            "securitySchemes": {
                "token": {"type": "apiKey", "in": "header", "name": "Authorization",
                          "description": "A dtsbridge or KBase token, bare or as `Bearer <token>`"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {
                        "type": "object",
                        "required": ["httpcode", "httpstatus", "message"],
                        "properties": {"httpcode": {"type": "integer"}, "httpstatus": _STR, "message": _STR,
                                       "reason": _STR, "job_id": _STR, "status": _STR},
                    }},
                },
                "TransferRequest": {
                    "type": "object",
                    "required": ["target_user", "subdirectory"],
                    "properties": {
                        "target_user": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,99}$"},
                        "subdirectory": {"type": "string", "minLength": 1,
                                         "description": "A folder of the DTS area, relative to dts_root or "
                                                        "as a full path inside it"},
                        "timeout_seconds": _TIMEOUT,
                    },
                },
                "SubmitRequest": {
                    "type": "object",
                    "required": ["target_user", "subdirectory"],
                    "properties": {
                        "target_user": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,99}$"},
                        "subdirectory": {"type": "string", "minLength": 1},
                        "staging_timeout": {"type": "number", "exclusiveMinimum": True, "minimum": 0,
                                            "maximum": staging_max_timeout},
                        "timeout_seconds": _TIMEOUT,
                    },
                },
                "DoneStagingRequest": {
                    "type": "object",
                    "required": ["job_id", "authcode", "success"],
                    "properties": {
                        "job_id": _STR, "authcode": _STR, "success": {"type": "boolean"},
                        "path": _STR, "staged_to": _STR, "msg": _STR,
                    },
                },
                "JobIdRequest": {"type": "object", "required": ["job_id"], "properties": {"job_id": _STR}},
                "Result": {
                    "type": "object",
                    "required": ["path", "job_id", "files", "bytes"],
                    "properties": {"path": _STR, "job_id": _STR, "files": _INT, "bytes": _INT},
                },
                "Accepted": {
                    "type": "object",
                    "required": ["job_id", "status"],
                    "properties": {"job_id": _STR, "status": {"type": "string", "enum": STATUSES}},
                },
                "Submitted": {
                    "type": "object",
                    "required": ["job_id", "authcode", "error", "msg"],
                    "properties": {"job_id": _STR, "authcode": _STR, "error": {"type": "boolean"}, "msg": _STR,
                                   "status": _STR},
                },
                "Staged": {
                    "type": "object",
                    "required": ["job_id", "status", "error"],
                    "properties": {"job_id": _STR, "status": _STR, "error": {"type": "boolean"}, "msg": _STR},
                },
                "Job": {"type": "object", "required": ["job_id", "status"], "properties": job_props},
                "JobList": {"type": "object", "required": ["jobs"],
                            "properties": {"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}}},
                "Health": {"type": "object", "required": ["status"],
                           "properties": {"status": _STR, "problems": {"type": "array", "items": _STR}}},
            },
        },
        "security": [{"token": []}],
        "paths": {
            "/complete_transfer": {"post": {
                "summary": "Copy a DTS folder into a user's datastore, verified and owned",
                "parameters": [{"name": "Prefer", "in": "header", "required": False, "schema": _STR,
                                "description": "`respond-async` answers 202 at once"}],
                "requestBody": _body("TransferRequest"),
                "responses": {
                    "201": _ok("Copied and verified", "Result"),
                    "200": _ok("A repeat of a request that already succeeded; nothing copied again", "Result"),
                    "202": _ok("Accepted (Prefer: respond-async); follow Location", "Accepted",
                               {"Location": {"schema": _STR}}),
                    "400": _error("Bad body, bad or unknown user, or the DTS area itself"),
                    "403": _error("The token lacks the role, or the folder is outside the DTS area or unsafe"),
                    "404": _error("The folder does not exist or is not a folder"),
                    "409": _error("The job was cancelled while the request waited (reason: cancelled)"),
                    "500": _error("The copy failed; nothing was left behind"),
                    **_COMMON,
                },
            }},
            "/transferStatus": {"get": {
                "summary": "A job's state",
                "parameters": [{"name": "job_id", "in": "query", "required": True, "schema": _STR}],
                "responses": {
                    "200": _ok("The job", "Job"),
                    "400": _error("job_id missing"),
                    "403": _error("Neither a transfer service nor the job's target user"),
                    "404": _error("Unknown job"),
                    "401": _COMMON["401"], "503": _COMMON["503"],
                },
            }},
            "/submitTransfer": {"post": {
                "summary": "Register a job that waits for a stager",
                "requestBody": _body("SubmitRequest"),
                "responses": {
                    "202": _ok("Registered; the authcode goes to the stager", "Submitted",
                               {"Location": {"schema": _STR}}),
                    "400": _error("Bad body or user"),
                    "403": _error("The token lacks the role, or the folder is outside the DTS area"),
                    **_COMMON,
                },
            }},
            "/doneStaging": {"post": {
                "summary": "A stager reports (the authcode is the credential)",
                "security": [],
                "requestBody": _body("DoneStagingRequest"),
                "responses": {
                    "200": _ok("Accepted", "Staged"),
                    "400": _error("Bad parameters"),
                    "403": _error("Wrong or used code, unknown job, a job not waiting for staging, or a path "
                                  "that is not the submitted subdirectory or a folder inside it (the code stays usable)"),
                    "413": _COMMON["413"], "503": _COMMON["503"],
                },
            }},
            "/cancelTransfer": {"post": {
                "summary": "Cancel a queued, staging or running job",
                "requestBody": _body("JobIdRequest"),
                "responses": {
                    "200": _ok("Cancelled", "Job"),
                    "400": _error("job_id missing"),
                    "403": _error("The token lacks the role"),
                    "404": _error("Unknown job"),
                    "409": _error("The job had already ended"),
                    **_COMMON,
                },
            }},
            "/jobs": {"get": {
                "summary": "Recent jobs, newest first (a user sees only their own)",
                "parameters": [
                    {"name": "user", "in": "query", "required": False, "schema": _STR},
                    {"name": "status", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": STATUSES}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                ],
                "responses": {
                    "200": _ok("The jobs", "JobList"),
                    "400": _error("Bad parameter"),
                    "403": _error("A user asked for another user's jobs"),
                    "401": _COMMON["401"], "503": _COMMON["503"],
                },
            }},
            "/events": {"get": {
                "summary": "Server-Sent Events of job changes (a user sees their own jobs)",
                "description": "Every job change (created, each status entered, progress at most once a second "
                               "per job, the end) as `id: <stream id>`, `event: job`, `data: <the job as "
                               "/transferStatus gives it>`. With `Last-Event-ID` (header, or the "
                               "`last_event_id` query parameter) the stream resumes right after that event "
                               "(events are kept at least 24 hours); without it, it starts with the next "
                               "change. A comment line every 15 s keeps proxies from closing it; the comment "
                               "`: live` marks the end of a replay.",
                "parameters": [
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": _STR},
                    {"name": "last_event_id", "in": "query", "required": False, "schema": _STR},
                    {"name": "user", "in": "query", "required": False, "schema": _STR},
                    {"name": "job_id", "in": "query", "required": False, "schema": _STR},
                ],
                "responses": {
                    "200": {"description": "The event stream (never ends by itself)",
                            "content": {"text/event-stream": {"schema": _STR}}},
                    "400": _error("Last-Event-ID is not an event id"),
                    "403": _error("A user asked for another user's jobs"),
                    "401": _COMMON["401"], "503": _COMMON["503"],
                },
            }},
            "/ui": {"get": {
                "summary": "Redirects to /ui/",
                "security": [],
                "responses": {"301": {"description": "To /ui/", "headers": {"Location": {"schema": _STR}},
                                      "content": {"text/html": {"schema": _STR}}}},
            }},
            "/ui/": _open_get("The web page: jobs with live progress (the token is typed into the page)",
                              "HTML", "text/html"),
            "/ui/app.js": _open_get("The page's script", "JavaScript", "text/javascript"),
            "/ui/app.css": _open_get("The page's style sheet", "CSS", "text/css"),
            "/healthz": {"get": {
                "summary": "Health: Redis answers, both roots reachable, not draining",
                "security": [],
                "responses": {"200": _ok("Healthy", "Health"), "503": _ok("What is wrong", "Health")},
            }},
            "/metrics": _open_get("Prometheus metrics", "Prometheus text format", "text/plain"),
            "/openapi.json": _open_get("This document", "OpenAPI 3", "application/json", {"type": "object"}),
        },
    }
