"""The admin and tenant portals: server-rendered pages (jinja2) over the management service.

They work without JavaScript and load nothing from outside the cloud: one stylesheet of our own.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from roles.management.portal._account import account_routes
from roles.management.portal._admin import admin_routes
from roles.management.portal._tenant import tenant_routes
from roles.management.portal._web import current_page, render, security_headers

__all__ = ["STATIC_DIR", "current_page", "portal_routes", "render", "security_headers"]

STATIC_DIR = Path(__file__).with_name("static")


def portal_routes() -> list[web.AbstractRouteDef]:
    return [
        *account_routes(),
        *tenant_routes(),
        *admin_routes(),
        web.static("/static", STATIC_DIR, append_version=False),
    ]
