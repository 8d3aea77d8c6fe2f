"""The management role's public HTTPS app: the REST API under ``/api/v1``, ``/openapi.json``, and the
admin (``/admin/``) and tenant (``/portal/``) portals on the same listener."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from roles.management._input import checked_text
from roles.management._request import SERVICE
from roles.management.api import api_routes
from roles.management.portal import current_page, portal_routes, render, security_headers
from roles.management.service import ManagementService
from shared.errors import SitecloudError
from shared.internal import error_middleware

__all__ = ["make_app"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_log = logging.getLogger("sitecloud.management.portal")


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/") or request.path == "/openapi.json"


async def _error_page(request: web.Request, error: SitecloudError, status: int) -> web.Response:
    """An error inside the normal layout: the navigation and sign-out stay when someone is signed in."""
    try:
        page = await current_page(request)
    except Exception:  # the session store itself may be what failed
        page = None
    return render(request, "error.html", page=page, status=status, error=error)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON errors on the API; on portal pages an HTML page that says what happened and what to do."""
    if _is_api(request):
        return await error_middleware(request, handler)
    try:
        response = await handler(request)
    except SitecloudError as err:
        return await _error_page(request, err, err.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        title = "Page not found" if exc.status == 404 else exc.reason
        answer = await _error_page(request, SitecloudError(title), exc.status)
        if "Allow" in exc.headers:  # RFC 9110 §15.5.6
            answer.headers["Allow"] = exc.headers["Allow"]
        return answer
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        _log.exception("unhandled error in %s %s", request.method, request.path)
        return await _error_page(request, SitecloudError("Something went wrong on our side"), 500)
    security_headers(response)
    return response


def make_app(service: ManagementService) -> web.Application:
    app = web.Application(middlewares=[_errors, checked_text], client_max_size=1024 * 1024)
    app[SERVICE] = service
    app.add_routes(api_routes())
    app.add_routes(portal_routes())
    return app
