"""The management role's public HTTPS app: the REST API under ``/api/v1``, ``/openapi.json``, and the
admin (``/admin/``) and tenant (``/portal/``) portals on the same listener."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from roles.management._input import checked_text
from roles.management.api import SERVICE, api_routes
from roles.management.portal import portal_routes, render, security_headers
from roles.management.service import ManagementService
from shared.errors import SitecloudError
from shared.internal import error_middleware

__all__ = ["make_app"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_log = logging.getLogger("sitecloud.management.portal")


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/") or request.path == "/openapi.json"


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON errors on the API; on portal pages an HTML page that says what happened and what to do."""
    if _is_api(request):
        return await error_middleware(request, handler)
    try:
        response = await handler(request)
    except SitecloudError as err:
        return render(request, "error.html", page=None, status=err.status, error=err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        title = "Page not found" if exc.status == 404 else exc.reason
        return render(request, "error.html", page=None, status=exc.status, error=SitecloudError(title))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        _log.exception("unhandled error in %s %s", request.method, request.path)
        return render(
            request,
            "error.html",
            page=None,
            status=500,
            error=SitecloudError("Something went wrong on our side"),
        )
    security_headers(response)
    return response


def make_app(service: ManagementService) -> web.Application:
    app = web.Application(middlewares=[_errors, checked_text], client_max_size=1024 * 1024)
    app[SERVICE] = service
    app.add_routes(api_routes())
    app.add_routes(portal_routes())
    return app
