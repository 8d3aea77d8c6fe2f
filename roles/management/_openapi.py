"""The REST API's route table and the OpenAPI 3.1 document generated from it (``/openapi.json``).

Each :class:`Operation` names its handler, its ``operationId``, and the models of its request body,
query parameters and answer (:mod:`roles.management._models`). The API module registers the routes
from the same table and validates bodies and queries with the same models, so the document cannot
drift from the code: there is no schema text here, only how the table maps onto OpenAPI.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from roles.management._models import Error, Progress, Query
from roles.management._site_backups import BACKUP_NAME_PATTERN
from shared.names import (
    HOSTNAME_MAX,
    NAME_MAX,
    NAME_PATTERN,
    SITE_NAME_MAX,
    SITE_NAME_PATTERN,
    SLOT_NAME_PATTERN,
)
from shared.version import CODE_VERSION

__all__ = [
    "BACKUP",
    "HOST",
    "HOSTNAME",
    "PLAN",
    "SITE",
    "SLOT",
    "SUBSCRIPTION",
    "TENANT",
    "TOKEN",
    "USER",
    "VERSION",
    "Operation",
    "Param",
    "openapi_document",
]

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REF = "#/components/schemas/{model}"

_ERRORS = {
    400: "invalid input, an unknown query parameter, or a malformed request",
    401: "no token, or the token is not valid",
    403: "the caller may not do this",
    404: "no such resource (also: another tenant's)",
    409: "already exists, a plan limit is reached, or not supported on this fabric",
    413: "over the storage quota, or a body over the size limit",
    429: "too many attempts (failed sign-ins, certificate orders); the hint says when to try again",
    503: "a role this needs cannot be reached now",
}


@dataclass(frozen=True)
class Param:
    """A path parameter."""

    name: str
    schema: Json
    description: str


_ID = {"type": "integer", "minimum": 0, "maximum": 999_999_999}
SITE = Param(
    "name",
    {"type": "string", "minLength": 1, "maxLength": SITE_NAME_MAX, "pattern": SITE_NAME_PATTERN},
    "site name",
)
PLAN = Param(
    "name", {"type": "string", "minLength": 1, "maxLength": NAME_MAX, "pattern": NAME_PATTERN}, "plan name"
)
SUBSCRIPTION = Param("id", _ID, "subscription id")
TOKEN = Param("id", _ID, "token id")
HOSTNAME = Param("hostname", {"type": "string", "minLength": 1, "maxLength": HOSTNAME_MAX}, "host name")
SLOT = Param("slot", {"type": "string", "pattern": SLOT_NAME_PATTERN}, "slot name (e.g. staging)")
HOST = Param("name", {"type": "string", "minLength": 1, "maxLength": HOSTNAME_MAX}, "host name")
TENANT = Param(
    "name", {"type": "string", "minLength": 1, "maxLength": NAME_MAX, "pattern": NAME_PATTERN}, "tenant name"
)
VERSION = Param("version", _ID, "content version number (see the site's versions)")
BACKUP = Param(
    "backup",
    {"type": "string", "pattern": BACKUP_NAME_PATTERN},
    "a scheduled backup's name (see the site's backups)",
)
USER = Param("username", {"type": "string", "minLength": 1, "maxLength": NAME_MAX}, "user name")


@dataclass(frozen=True)
class Operation:
    """One route of the API, as served and as documented."""

    method: str
    # The aiohttp route path; a parameter may carry a regex (``{id:\\d{1,9}}``).
    path: str
    handler: Handler
    operation_id: str
    summary: str
    tag: str
    # The JSON answer's model; None for 204, or for an answer given only as ``content``.
    answer: type[BaseModel] | None = None
    ok: int = 200
    body: type[BaseModel] | None = None
    # False: an empty body counts as ``{}``.
    body_required: bool = True
    query: type[Query] | None = None
    params: tuple[Param, ...] = ()
    # 4xx/5xx beyond the ones every operation of its kind can answer (see :meth:`error_codes`).
    errors: tuple[int, ...] = ()
    public: bool = False
    # A non-JSON answer (or an alternative to JSON): its media type.
    content: str | None = None
    # A non-JSON request body (a zip): its media type; the handler reads it.
    raw_body: str | None = None
    # A JSON body allowed to be larger than the app's usual limit (a backup being restored).
    body_limit: int | None = None

    @property
    def doc_path(self) -> str:
        return re.sub(r"\{(\w+):(?:[^{}]|\{[^{}]*\})*\}", r"{\1}", self.path)

    def error_codes(self) -> list[int]:
        """400 everywhere (an unknown query parameter is refused on every call); 401 unless public; 404
        where the path names something."""
        codes = {400, *self.errors}
        if not self.public:
            codes.add(401)
        if self.params:
            codes.add(404)
        return sorted(codes)


def _clean(schema: Json) -> Json:
    """Pydantic's titles repeat the field names: left out of the document."""
    return {k: v for k, v in schema.items() if k != "title"}


def _not_null(schema: Json) -> Json:
    """A query parameter is left out, never null: ``X | None`` is documented as ``X``."""
    options = [o for o in schema.get("anyOf", []) if o != {"type": "null"}]
    if len(options) != 1:
        return schema
    out = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
    return {**options[0], **out}


def _query_parameters(model: type[Query], defs: Json) -> list[Json]:
    schema = model.model_json_schema(ref_template=_REF, mode="validation")
    defs.update(schema.get("$defs", {}))
    out = []
    for name, prop in schema.get("properties", {}).items():
        prop = _not_null(_clean(prop))
        description = prop.pop("description", None)
        param: Json = {
            "name": name,
            "in": "query",
            "required": name in schema.get("required", []),
            "schema": prop,
        }
        if description:
            param["description"] = description
        out.append(param)
    return out


def _responses(op: Operation) -> Json:
    ok: Json
    if op.ok == 204:
        ok = {"description": "done"}
    else:
        content: Json = {}
        if op.answer is not None:
            content["application/json"] = {"schema": {"$ref": _REF.format(model=op.answer.__name__)}}
        if op.content == "application/x-ndjson":
            content[op.content] = {"schema": {"$ref": _REF.format(model=Progress.__name__)}}
        elif op.content:
            content[op.content] = {"schema": {"type": "string"}}
        ok = {"description": "OK", "content": content}
    error = {"application/json": {"schema": {"$ref": _REF.format(model=Error.__name__)}}}
    return {
        str(op.ok): ok,
        **{str(code): {"description": _ERRORS[code], "content": error} for code in op.error_codes()},
    }


def _operation(op: Operation, defs: Json) -> Json:
    out: Json = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "responses": _responses(op),
    }
    parameters = [
        {"name": p.name, "in": "path", "required": True, "schema": p.schema, "description": p.description}
        for p in op.params
    ]
    if op.query is not None:
        parameters += _query_parameters(op.query, defs)
    if parameters:
        out["parameters"] = parameters
    if op.public:
        out["security"] = []
    if op.body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=op.body.__name__)}}},
        }
    elif op.raw_body:
        out["requestBody"] = {
            "required": True,
            "content": {op.raw_body: {"schema": {"type": "string", "format": "binary"}}},
        }
    return out


def _schemas(operations: Sequence[Operation]) -> Json:
    requests: set[type[BaseModel]] = {op.body for op in operations if op.body is not None}
    answers: set[type[BaseModel]] = {op.answer for op in operations if op.answer is not None}
    answers |= {Error, Progress}
    pairs: list[tuple[type[BaseModel], Any]] = [(m, "validation") for m in requests]
    pairs += [(m, "serialization") for m in answers]
    pairs.sort(key=lambda pair: pair[0].__name__)
    _, top = models_json_schema(pairs, ref_template=_REF)
    return dict(top.get("$defs", {}))


def openapi_document(operations: Sequence[Operation]) -> Json:
    defs: Json = {}
    paths: Json = {}
    for op in operations:
        paths.setdefault(op.doc_path, {})[op.method.lower()] = _operation(op, defs)
    schemas = {**defs, **_schemas(operations)}
    tags: list[str] = []
    for op in operations:
        if op.tag not in tags:
            tags.append(op.tag)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sitecloud management API",
            "version": CODE_VERSION,
            "description": "Plans, tenants, subscriptions, sites and roles of a sitecloud. Errors are "
            '{"error": {"code", "message", "hint"?}}. Lists take limit and cursor and answer next_cursor '
            "(null on the last page); an unknown query parameter is refused.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [{"name": t} for t in tags],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API token"}
            },
        },
    }
