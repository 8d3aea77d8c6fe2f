"""The OpenAPI 3.1 document of the management REST API, served at ``/openapi.json``.

Written out by hand, next to the routes in :mod:`roles.management.api`; a test checks that both list
exactly the same operations.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from shared.version import CODE_VERSION

__all__ = ["openapi_document"]

Json = dict[str, Any]


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: Json, required: list[str] | None = None, *, closed: bool = False, **extra: Any) -> Json:
    out: Json = {"type": "object", "properties": props, **extra}
    if required:
        out["required"] = required
    if closed:
        out["additionalProperties"] = False
    return out


def _list(key: str, item: str) -> Json:
    return _obj({key: {"type": "array", "items": _ref(item)}}, [key])


_STR = {"type": "string"}
_STRS = {"type": "array", "items": {"type": "string"}}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_TIME = {"type": ["string", "null"], "format": "date-time"}
_NAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": 64,
    "pattern": "^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$",
}
_SITE_NAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": 63,
    "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
}
_PASSWORD = {"type": "string", "minLength": 10, "maxLength": 256}

_PLAN_QUOTAS: Json = {
    "max_sites": {"type": "integer", "minimum": 0, "maximum": 100000},
    "storage_mb": {"type": "integer", "minimum": 1, "maximum": 10000000},
    "bandwidth_mb_per_day": {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": 1000000000,
        "description": "null: unlimited. Stored and shown; metering comes later.",
    },
    "cpu_minutes_per_day": {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": 1000000000,
        "description": "null: unlimited. Stored and shown; metering comes later.",
    },
    "max_custom_hostnames": {
        "type": "integer",
        "minimum": 0,
        "maximum": 100000,
        "description": "custom host names across all sites of a subscription",
    },
    "compute_mode": {"type": "string", "enum": ["shared", "reserved"]},
    "worker_size": {
        "type": ["string", "null"],
        "enum": ["small", "medium", "large", None],
        "description": "required when compute_mode is reserved",
    },
    "always_on": _BOOL,
    "max_instances_per_site": {"type": "integer", "minimum": 1, "maximum": 100},
}

_SCHEMAS: Json = {
    "Error": _obj(
        {
            "error": _obj(
                {"code": _STR, "message": _STR, "hint": _STR},
                ["code", "message"],
            )
        },
        ["error"],
    ),
    "Health": _obj({"status": _STR, "code_version": _STR}, ["status"]),
    "Me": _obj(
        {"admin": _BOOL, "tenant": {"type": ["string", "null"]}, "username": {"type": ["string", "null"]}},
        ["admin", "tenant", "username"],
    ),
    "TokenRequest": _obj(
        {"username": _STR, "password": _STR, "name": _NAME}, ["username", "password"], closed=True
    ),
    "TokenCreate": _obj({"name": _NAME}, ["name"], closed=True),
    "Token": _obj(
        {"id": _INT, "name": _STR, "prefix": _STR, "created_at": _TIME, "last_used_at": _TIME},
        ["id", "name", "prefix", "created_at", "last_used_at"],
    ),
    "TokenCreated": {
        "allOf": [
            _ref("Token"),
            _obj({"token": {"type": "string", "description": "shown in this answer only"}}, ["token"]),
        ]
    },
    "SignUp": _obj({"username": _NAME, "password": _PASSWORD}, ["username", "password"], closed=True),
    "UserCreate": _obj(
        {
            "username": _NAME,
            "password": {**_PASSWORD, "description": "generated and returned once when left out"},
            "tenant": {"type": ["string", "null"], "description": "leave out for an admin account"},
        },
        ["username"],
        closed=True,
    ),
    "User": _obj(
        {
            "id": _INT,
            "username": _STR,
            "admin": _BOOL,
            "tenant": {"type": ["string", "null"]},
            "created_at": _TIME,
            "last_sign_in_at": _TIME,
            "password": {"type": "string", "description": "only when generated, in the create answer"},
        },
        ["id", "username", "admin", "tenant"],
    ),
    "CloudSettings": _obj(
        {"signup_enabled": _BOOL, "dns_resolvers": _STRS, "ip_dns_services": _STRS},
        ["signup_enabled", "dns_resolvers", "ip_dns_services"],
    ),
    "CloudSettingsUpdate": _obj(
        {
            "signup_enabled": _BOOL,
            "dns_resolvers": {
                **_STRS,
                "description": "where custom hostname ownership is checked: 'ip' or 'ip:port'; [] = the system's",
            },
            "ip_dns_services": {
                **_STRS,
                "description": "wildcard DNS services (nip.io, ...) no custom hostname may be under",
            },
        },
        closed=True,
    ),
    "PlanCreate": _obj(
        {"name": _NAME, **_PLAN_QUOTAS, "public": _BOOL, "retired": _BOOL},
        ["name", "max_sites", "storage_mb"],
        closed=True,
    ),
    "PlanUpdate": _obj({**_PLAN_QUOTAS, "public": _BOOL, "retired": _BOOL}, closed=True),
    "Plan": _obj(
        {
            "id": _INT,
            "name": _STR,
            **_PLAN_QUOTAS,
            "public": _BOOL,
            "retired": _BOOL,
            "subscriptions": {"type": "integer", "description": "how many subscriptions use it (admins)"},
        },
        ["id", "name", *_PLAN_QUOTAS, "public", "retired"],
    ),
    "TenantCreate": _obj({"name": _NAME}, ["name"], closed=True),
    "TenantCreated": _obj(
        {"id": _INT, "name": _STR, "token": {"type": "string", "description": "shown in this answer only"}},
        ["id", "name", "token"],
    ),
    "Tenant": _obj(
        {
            "id": _INT,
            "name": _STR,
            "subscriptions": _INT,
            "sites": _INT,
            "users": _INT,
            "created_at": _TIME,
        },
        ["id", "name"],
    ),
    "SubscriptionCreate": _obj(
        {"plan": _NAME, "tenant": {**_NAME, "description": "admins: the tenant; tenants: leave out"}},
        ["plan"],
        closed=True,
    ),
    "Subscription": _obj(
        {
            "id": _INT,
            "tenant": _STR,
            "plan": _STR,
            "state": {"type": "string", "enum": ["active", "suspended"]},
            "created_at": _TIME,
            "quotas": _obj(_PLAN_QUOTAS),
            "usage": _obj(
                {
                    "sites": _INT,
                    "custom_hostnames": _INT,
                    "storage_bytes": {
                        "type": ["integer", "null"],
                        "description": "from the fileserver; null when it cannot be asked now",
                    },
                },
                ["sites", "custom_hostnames", "storage_bytes"],
            ),
            "site_names": {"type": "array", "items": _STR},
            "verification_id": {
                "type": "string",
                "description": "the value of a TXT record asuid.<hostname> that proves a custom hostname is yours",
            },
        },
        ["id", "tenant", "plan", "state", "quotas", "usage", "verification_id"],
    ),
    "SiteCreate": _obj(
        {"name": _SITE_NAME, "subscription": {"type": "integer", "minimum": 0, "maximum": 2147483647}},
        ["name", "subscription"],
        closed=True,
    ),
    "Site": _obj(
        {
            "name": _STR,
            "url": _STR,
            "subscription": _INT,
            "tenant": _STR,
            "state": {"type": "string", "enum": ["running", "stopped"]},
            "instances": {"type": "integer", "minimum": 1},
            "hostnames": {"type": "array", "items": _STR},
            "ftp": _obj(
                {
                    "host": _STR,
                    "port": _INT,
                    "user": _STR,
                    "password": {"type": "string", "description": "only when just set"},
                },
                ["host", "port", "user"],
            ),
            "deploy": _obj(
                {
                    "url": _STR,
                    "user": _STR,
                    "password": {"type": "string", "description": "only when just set"},
                },
                ["url", "user"],
            ),
            "problems": {
                "type": "array",
                "description": "why a worker cannot serve the site (empty: none)",
                "items": _obj({"worker": _STR, "reason": _STR}, ["worker", "reason"]),
            },
            "apps": {
                "type": "array",
                "description": "the site's app on each of its workers: state and the limits it met (site show)",
                "items": {"type": "object", "required": ["worker", "state"]},
            },
        },
        ["name", "url", "subscription", "tenant", "state", "hostnames", "ftp", "deploy"],
    ),
    "Deployed": _obj({"site": _STR, "version": _INT, "files": _INT, "bytes": _INT}, ["site", "version"]),
    "AppSettings": _obj(
        {"site": _STR, "settings": {"type": "object", "additionalProperties": _STR}}, ["site", "settings"]
    ),
    "AppSettingsPatch": {
        "type": "object",
        "description": "keys to set (string) or remove (null)",
        "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"},
        "additionalProperties": {"type": ["string", "null"], "maxLength": 4096},
    },
    "HostnameAdd": _obj(
        {
            "hostname": {"type": "string", "minLength": 1, "maxLength": 253},
            "certificate": {"type": "string", "description": "PEM certificate (chain), leaf first"},
            "key": {"type": "string", "description": "PEM private key (may be in 'certificate' instead)"},
            "pfx": {"type": "string", "contentEncoding": "base64", "description": "a PFX/PKCS#12 file"},
            "password": {"type": "string", "description": "for the PFX or an encrypted key"},
        },
        ["hostname"],
        closed=True,
    ),
    "DnsRecord": _obj(
        {"type": {"type": "string", "enum": ["TXT", "CNAME"]}, "name": _STR, "value": _STR},
        ["type", "name", "value"],
    ),
    "Hostname": _obj(
        {
            "hostname": _STR,
            "site": _STR,
            "state": {
                "type": "string",
                "enum": ["pending", "verified"],
                "description": "pending: not served until DNS proves the tenant owns the name",
            },
            "verified_at": {"type": ["string", "null"]},
            "checked_at": {"type": ["string", "null"]},
            "problem": {"type": ["string", "null"], "description": "why the last DNS check did not prove it"},
            "records": {
                "type": "array",
                "items": _ref("DnsRecord"),
                "description": "for a pending name: create either record, then verify",
            },
            "certificate": {
                "oneOf": [
                    {"type": "null"},
                    _obj(
                        {
                            "subject": _STR,
                            "issuer": _STR,
                            "names": {"type": "array", "items": _STR},
                            "not_after": _STR,
                            "fingerprint_sha256": _STR,
                        },
                        ["subject", "issuer", "names", "not_after", "fingerprint_sha256"],
                    ),
                ]
            },
        },
        ["hostname", "site", "state", "certificate", "records"],
    ),
    "Hostnames": _obj(
        {"site": _STR, "verification_id": _STR, "hostnames": {"type": "array", "items": _ref("Hostname")}},
        ["site", "verification_id", "hostnames"],
    ),
    "SiteVersion": _obj(
        {
            "version": _INT,
            "time": {"type": "number", "description": "seconds since the epoch"},
            "source": {"type": "string", "enum": ["ftp", "deploy", "rollback"]},
            "files": _INT,
            "total_bytes": _INT,
        },
        ["version", "time", "source", "files", "total_bytes"],
    ),
    "SiteVersions": _obj(
        {"site": _STR, "versions": {"type": "array", "items": _ref("SiteVersion")}}, ["site", "versions"]
    ),
    "Rollback": _obj(
        {"version": {"type": "integer", "minimum": 1, "description": "default: the one before the newest"}},
        closed=True,
    ),
    "RolledBack": _obj(
        {"site": _STR, "version": _INT, "rolled_back_to": _INT, "total_bytes": _INT},
        ["site", "version", "rolled_back_to"],
    ),
    "SiteScale": _obj(
        {"instances": {"type": "integer", "minimum": 1, "maximum": 1000}}, ["instances"], closed=True
    ),
    "Availability": _obj(
        {"hostname": _STR, "available": _BOOL, "reason": _STR}, ["hostname", "available", "reason"]
    ),
}

_ERRORS = {
    400: "invalid input or a malformed request",
    401: "no token, or the token is not valid",
    403: "the caller may not do this",
    404: "no such resource (also: another tenant's)",
    409: "already exists, a plan limit is reached, or not supported on this fabric",
    413: "over the storage quota",
    429: "too many failed sign-ins",
    503: "a role this needs cannot be reached now",
}


def _json_content(schema: Json) -> Json:
    return {"application/json": {"schema": schema}}


def _op(
    summary: str,
    *,
    ok: int = 200,
    answer: Json | None = None,
    body: str | None = None,
    errors: tuple[int, ...] = (),
    public: bool = False,
    tag: str = "",
    content: Json | None = None,
    request: Json | None = None,
) -> Json:
    responses: Json = {}
    if ok == 204:
        responses["204"] = {"description": "done"}
    else:
        responses[str(ok)] = {"description": "OK", "content": content or _json_content(answer or {})}
    codes = set(errors) | ({400} if body or request else set()) | (set() if public else {401})
    for code in sorted(codes):
        responses[str(code)] = {"description": _ERRORS[code], "content": _json_content(_ref("Error"))}
    out: Json = {"summary": summary, "tags": [tag] if tag else [], "responses": responses}
    if public:
        out["security"] = []
    if body:
        out["requestBody"] = {"required": True, "content": _json_content(_ref(body))}
    if request:
        out["requestBody"] = request
    return out


def _path_param(name: str, schema: Json, description: str) -> Json:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


_SITE = _path_param("name", _SITE_NAME, "site name")
_PLAN = _path_param("name", _NAME, "plan name")
_SUB = _path_param("id", {"type": "integer", "minimum": 0, "maximum": 999999999}, "subscription id")
_TOKEN = _path_param("id", {"type": "integer", "minimum": 0, "maximum": 999999999}, "token id")
_HOST = _path_param("hostname", {"type": "string", "minLength": 1, "maxLength": 253}, "host name")
_ROLE = _path_param("role", _STR, "role kind")
_ROLE_HOST = _path_param("host", {"type": "string", "minLength": 1, "maxLength": 253}, "host name")


def _paths() -> Json:
    from roles.management._fabric_api import fabric_openapi_paths  # lazily: it imports the API module

    sub_item = _ref("Subscription")
    site = _ref("Site")
    return {
        "/api/v1/health": {"get": _op("Liveness of the API", answer=_ref("Health"), public=True, tag="meta")},
        "/openapi.json": {"get": _op("This document", answer={"type": "object"}, public=True, tag="meta")},
        "/api/v1/auth/token": {
            "post": _op(
                "Sign in with a user name and password and get an API token (rate limited)",
                ok=201,
                answer=_ref("TokenCreated"),
                body="TokenRequest",
                errors=(401, 429),
                public=True,
                tag="accounts",
            )
        },
        "/api/v1/signup": {
            "post": _op(
                "Sign up: a new tenant and its first user (when the admin allows sign-up)",
                ok=201,
                answer=_ref("User"),
                body="SignUp",
                errors=(403, 409),
                public=True,
                tag="accounts",
            )
        },
        "/api/v1/me": {"get": _op("Who the token belongs to", answer=_ref("Me"), tag="accounts")},
        "/api/v1/tokens": {
            "get": _op("The caller's API tokens", answer=_list("tokens", "Token"), tag="accounts"),
            "post": _op(
                "Create an API token (shown once)",
                ok=201,
                answer=_ref("TokenCreated"),
                body="TokenCreate",
                tag="accounts",
            ),
        },
        "/api/v1/tokens/{id}": {
            "parameters": [_TOKEN],
            "delete": _op("Revoke one of the caller's tokens", ok=204, errors=(404,), tag="accounts"),
        },
        "/api/v1/users": {
            "get": _op("Every user (admin)", answer=_list("users", "User"), errors=(403,), tag="accounts"),
            "post": _op(
                "Create an admin account, or a user of a tenant (admin)",
                ok=201,
                answer=_ref("User"),
                body="UserCreate",
                errors=(403, 404, 409),
                tag="accounts",
            ),
        },
        "/api/v1/settings": {
            "get": _op("Cloud settings (admin)", answer=_ref("CloudSettings"), errors=(403,), tag="accounts"),
            "patch": _op(
                "Change cloud settings (admin)",
                answer=_ref("CloudSettings"),
                body="CloudSettingsUpdate",
                errors=(403,),
                tag="accounts",
            ),
        },
        "/api/v1/plans": {
            "get": _op(
                "Plans: all for admins, public ones for tenants", answer=_list("plans", "Plan"), tag="plans"
            ),
            "post": _op(
                "Create a plan (admin)",
                ok=201,
                answer=_ref("Plan"),
                body="PlanCreate",
                errors=(403, 409),
                tag="plans",
            ),
        },
        "/api/v1/plans/{name}": {
            "parameters": [_PLAN],
            "get": _op("One plan", answer=_ref("Plan"), errors=(404,), tag="plans"),
            "patch": _op(
                "Change a plan's quotas, make it public or private, retire it (admin); applies to its subscriptions",
                answer=_ref("Plan"),
                body="PlanUpdate",
                errors=(403, 404),
                tag="plans",
            ),
        },
        "/api/v1/tenants": {
            "get": _op("Tenants (admin)", answer=_list("tenants", "Tenant"), errors=(403,), tag="tenants"),
            "post": _op(
                "Create a tenant and its first token (admin)",
                ok=201,
                answer=_ref("TenantCreated"),
                body="TenantCreate",
                errors=(403, 409),
                tag="tenants",
            ),
        },
        "/api/v1/subscriptions": {
            "get": _op(
                "Subscriptions with quotas and usage: all for admins, own for tenants",
                answer=_list("subscriptions", "Subscription"),
                tag="subscriptions",
            ),
            "post": _op(
                "Subscribe a tenant to a plan (admin), or oneself to a public plan (tenant)",
                ok=201,
                answer=sub_item,
                body="SubscriptionCreate",
                errors=(403, 404),
                tag="subscriptions",
            ),
        },
        "/api/v1/subscriptions/{id}": {
            "parameters": [_SUB],
            "get": _op(
                "One subscription with its quotas and usage",
                answer=sub_item,
                errors=(404,),
                tag="subscriptions",
            ),
            "delete": _op(
                "Delete a subscription and its sites (admin)", ok=204, errors=(403, 404), tag="subscriptions"
            ),
        },
        "/api/v1/subscriptions/{id}/suspend": {
            "parameters": [_SUB],
            "post": _op(
                "Suspend: its sites go offline (admin)",
                answer=sub_item,
                errors=(403, 404),
                tag="subscriptions",
            ),
        },
        "/api/v1/subscriptions/{id}/resume": {
            "parameters": [_SUB],
            "post": _op(
                "Resume a suspended subscription (admin)",
                answer=sub_item,
                errors=(403, 404),
                tag="subscriptions",
            ),
        },
        "/api/v1/sites": {
            "get": _op("Sites: all for admins, own for tenants", answer=_list("sites", "Site"), tag="sites"),
            "post": _op(
                "Create a site; the answer has its publishing password, once",
                ok=201,
                answer=site,
                body="SiteCreate",
                errors=(403, 404, 409),
                tag="sites",
            ),
        },
        "/api/v1/sites/{name}": {
            "parameters": [_SITE],
            "get": _op("One site", answer=site, errors=(404,), tag="sites"),
            "delete": _op("Delete a site and its content", ok=204, errors=(404,), tag="sites"),
        },
        "/api/v1/sites/{name}/deploy": {
            "parameters": [_SITE],
            "post": _op(
                "Replace the site's content with a zip (web deploy)",
                answer=_ref("Deployed"),
                errors=(400, 404, 413, 503),
                request={
                    "required": True,
                    "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
                },
                tag="sites",
            ),
        },
        "/api/v1/sites/{name}/versions": {
            "parameters": [_SITE],
            "get": _op(
                "The site's kept content versions, oldest first",
                answer=_ref("SiteVersions"),
                errors=(404, 503),
                tag="sites",
            ),
        },
        "/api/v1/sites/{name}/rollback": {
            "parameters": [_SITE],
            "post": _op(
                "Make an earlier version the site's content again, as a new version",
                answer=_ref("RolledBack"),
                body="Rollback",
                errors=(404, 413, 503),
                tag="sites",
            ),
        },
        "/api/v1/sites/{name}/start": {
            "parameters": [_SITE],
            "post": _op("Start a site: it is routed and served", answer=site, errors=(403, 404), tag="sites"),
        },
        "/api/v1/sites/{name}/scale": {
            "parameters": [_SITE],
            "post": _op(
                "Run the site on N workers, balanced by the front ends (at least two for availability "
                "where the pool has them; at most the plan's max_instances_per_site)",
                answer=site,
                body="SiteScale",
                errors=(404, 409),
                tag="sites",
            ),
        },
        "/api/v1/sites/{name}/stop": {
            "parameters": [_SITE],
            "post": _op(
                "Stop a site: visitors get a 'stopped' page", answer=site, errors=(404,), tag="sites"
            ),
        },
        "/api/v1/sites/{name}/publishing-password": {
            "parameters": [_SITE],
            "post": _op(
                "Set a new FTP / web deploy password (shown once)", answer=site, errors=(404,), tag="sites"
            ),
        },
        "/api/v1/sites/{name}/publish-profile": {
            "parameters": [_SITE],
            "post": _op(
                "A .PublishSettings file for Visual Studio / WebMatrix. Passwords are stored hashed only, "
                "so this sets a new publishing password: the old one stops working.",
                content={"application/xml": {"schema": {"type": "string"}}},
                errors=(404,),
                tag="sites",
            ),
        },
        "/api/v1/sites/{name}/logs": {
            "parameters": [_SITE],
            "get": {
                **_op(
                    "The site's log from its workers: app output and access lines, as text; with "
                    "follow=1 the answer stays open and new lines stream as they come",
                    content={"text/plain": {"schema": {"type": "string"}}},
                    errors=(404, 503),
                    tag="sites",
                ),
                "parameters": [
                    {"name": "follow", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}},
                    {
                        "name": "lines",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 10000},
                    },
                ],
            },
        },
        "/api/v1/sites/{name}/settings": {
            "parameters": [_SITE],
            "get": _op("The site's app settings", answer=_ref("AppSettings"), errors=(404,), tag="sites"),
            "patch": _op(
                "Set (string) or remove (null) app settings",
                answer=_ref("AppSettings"),
                body="AppSettingsPatch",
                errors=(404, 409),
                tag="sites",
            ),
        },
        "/api/v1/sites/{name}/hostnames": {
            "parameters": [_SITE],
            "get": _op(
                "The site's custom host names", answer=_ref("Hostnames"), errors=(404,), tag="hostnames"
            ),
            "post": _op(
                "Claim a custom host name (pending until DNS proves it; a name another site claims is taken "
                "only with that proof), with a certificate (PEM or base64 PFX) that must cover it",
                ok=201,
                answer=_ref("Hostname"),
                body="HostnameAdd",
                errors=(400, 404, 409),
                tag="hostnames",
            ),
        },
        "/api/v1/sites/{name}/hostnames/{hostname}": {
            "parameters": [_SITE, _HOST],
            "delete": _op("Remove a custom host name", ok=204, errors=(404,), tag="hostnames"),
        },
        "/api/v1/sites/{name}/hostnames/{hostname}/verify": {
            "parameters": [_SITE, _HOST],
            "post": _op(
                "Check DNS now for proof that the tenant owns a pending host name",
                answer=_ref("Hostname"),
                errors=(404,),
                tag="hostnames",
            ),
        },
        "/api/v1/hostnames/{hostname}/availability": {
            "parameters": [_HOST],
            "get": _op(
                "Whether a host name is free for a site",
                answer=_ref("Availability"),
                errors=(400,),
                tag="hostnames",
            ),
        },
        # Hosts, roles and upgrades (issue 3) are described next to their routes.
        **fabric_openapi_paths(),
    }


@lru_cache(maxsize=1)
def _document() -> Json:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sitecloud management API",
            "version": CODE_VERSION,
            "description": "Plans, tenants, subscriptions, sites and roles of a sitecloud. "
            'Errors are {"error": {"code", "message", "hint"?}}.',
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [
            {"name": t}
            for t in (
                "meta",
                "accounts",
                "plans",
                "tenants",
                "subscriptions",
                "sites",
                "hostnames",
                "roles",
                "fabric",
            )
        ],
        "paths": _paths(),
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API token"}
            },
        },
    }


def openapi_document() -> Json:
    return copy.deepcopy(_document())
