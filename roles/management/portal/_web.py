"""What every portal page shares: templates, the signed-in session, CSRF checks, notices, errors.

Every form answers 303 to a page (POST → redirect → GET), which shows the outcome once (a flash, see
``_flash.py``), so a reload never sends a form again. Requests no page of ours would send (a bad CSRF
token, a NUL in a field, a number that is not one) get a plain 4xx error page instead.

Sessions live in ``__Host-`` cookies (Secure, HttpOnly, SameSite=Lax, Path=/). Every form carries a
CSRF token: the session's own once signed in, a double-submit cookie on the sign-in and sign-up forms.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from multidict import MultiDictProxy

from roles.management._input import check_text
from roles.management._request import service_of
from roles.management._site_backups import human_every
from roles.management.portal._flash import FLASH_COOKIE, open_flash, seal_flash
from roles.management.service import Principal
from shared.errors import BadRequest, ConfirmationRequired, Forbidden, SitecloudError
from shared.words import counted

__all__ = [
    "PRE_CSRF_COOKIE",
    "SESSION_COOKIE",
    "Page",
    "check_confirmed",
    "check_csrf",
    "check_origin",
    "confirm_page",
    "cookie",
    "current_page",
    "posted",
    "read_form",
    "redirect",
    "render",
    "require_page",
    "security_headers",
    "see_other",
]

SESSION_COOKIE = "__Host-sitecloud_session"
PRE_CSRF_COOKIE = "__Host-sitecloud_csrf"

_TEMPLATES = Path(__file__).with_name("templates")

# Fixed texts a redirect may ask the next page to show (?n=key): no text from the URL reaches a page.
NOTICES = {
    "signed-out": "You are signed out.",
    "subscribed": "Subscribed. You can create sites in the new subscription now.",
    "site-created": "Site created.",
    "slot-created": "Slot created: a site of its own, with its own content, publishing password and settings.",
    "slot-deleted": "Slot deleted.",
    "site-deleted": "Site deleted, with its content.",
    "started": "Site started: it serves visitors again.",
    "restarted": "App restarted: its next requests go to new processes on every worker.",
    "restart-pending": "Restart asked: the cloud's controller has not applied it yet; it takes effect as soon as it runs again.",
    "stopped": "Site stopped: visitors get a 'site stopped' page until you start it. "
    "Its content is kept, and you can still publish to it.",
    "settings-saved": "App settings saved.",
    "hostname-added": "Custom hostname added. It is served once DNS proves it is yours (see its records below).",
    "hostname-verified": "Custom hostname verified: it is served now.",
    "hostname-pending": "DNS does not prove that name is yours yet: create one of its records below, then verify.",
    "hostname-removed": "Custom hostname removed.",
    "hostname-renewing": "A new certificate is being ordered; the current one is served until it arrives.",
    "token-revoked": "Token revoked: it no longer works.",
    "plan-created": "Plan created.",
    "plan-saved": "Plan saved. Every subscription on it has the new quotas now.",
    "suspended": "Subscription suspended: its sites are offline and cannot be published to; their content is kept.",
    "resumed": "Subscription resumed: its running sites are back online.",
    "subscription-deleted": "Subscription deleted, with its sites.",
    "cloud-saved": "Cloud settings saved.",
    "password-reset": "New publishing password set: the old one no longer works.",
    "token-created": "Token created.",
    "role-removed": "Role removed from its host.",
    "role-started": "Role started.",
    "role-stopped": "Role stopped: start it again from its row.",
    "role-restarted": "Role restarted.",
    "plan-deleted": "Plan deleted.",
    "password-set": "New password set: sign in with it.",
    "role-repaired": "Role repaired.",
    "role-added": "Role added.",
}
_FLASH_SECONDS = 300


def _bytes(value: int | None) -> str:
    if value is None:
        return "unknown"
    size = float(value)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _ago(when: str | None) -> str:
    if not when:
        return "never"
    seen = dt.datetime.fromisoformat(when)
    seconds = int((dt.datetime.now(dt.UTC) - seen).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return seen.strftime("%Y-%m-%d")


def _utc_time(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _percent(used: float | None, limit: float | None) -> int:
    if used is None or not limit:
        return 0
    return max(0, min(100, round(100 * used / limit)))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["bytes"] = _bytes
    env.filters["ago"] = _ago
    env.filters["utc_time"] = _utc_time
    env.filters["every"] = human_every
    env.filters["counted"] = counted
    env.globals["percent"] = _percent
    return env


_ENV = _environment()


@dataclass(frozen=True)
class Page:
    """The signed-in browser behind a request."""

    who: Principal
    csrf: str


PAGE = web.RequestKey("portal_page", Page)


async def current_page(request: web.Request) -> Page | None:
    if PAGE in request:
        return request[PAGE]
    session = cookie(request, SESSION_COOKIE)
    if not session:
        return None
    found = await service_of(request).session(session)
    if found is None:
        return None
    page = Page(*found)
    request[PAGE] = page
    return page


async def require_page(request: web.Request, *, admin: bool = False) -> Page:
    page = await current_page(request)
    if page is None:
        raise web.HTTPSeeOther("/signin")
    if admin and not page.who.is_admin:
        raise Forbidden("this page is for hosting admins", hint="your sites are in the tenant portal")
    return page


def security_headers(response: web.StreamResponse) -> None:
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
    )
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")


def render(
    request: web.Request,
    template: str,
    *,
    page: Page | None,
    status: int = 200,
    error: SitecloudError | None = None,
    notice: str | None = None,
    **context: Any,
) -> web.Response:
    notice = notice or NOTICES.get(request.query.get("n", ""))
    flash = _take_flash(request)
    if flash is not None:
        notice = _notice_text(flash.get("notice")) or notice
        shown = flash.get("error")
        if error is None and isinstance(shown, dict):
            error = SitecloudError(str(shown.get("message", "")), hint=shown.get("hint") or None)
            status = 200  # the failed POST already answered 303; this page shows why
        data = flash.get("data")
        if isinstance(data, dict):
            context.update(data)
        sent = flash.get("form")
        if isinstance(sent, dict):
            context["form"] = sent
    context.setdefault("form", {})
    html = _ENV.get_template(template).render(
        page=page,
        who=page.who if page else None,
        csrf=page.csrf if page else context.pop("csrf", ""),
        error=error,
        notice=notice,
        path=request.path,
        **context,
    )
    response = web.Response(text=html, status=status, content_type="text/html")
    # Pages can show a password or token once: never cache them.
    response.headers["Cache-Control"] = "no-store"
    if flash is not None or cookie(request, FLASH_COOKIE):
        # A __Host- cookie is only replaced (here: expired) by a Set-Cookie that is Secure too.
        response.del_cookie(FLASH_COOKIE, path="/", secure=True, httponly=True, samesite="Lax")
    security_headers(response)
    return response


# Fields a refused form does not carry back: tokens, confirmations and passwords.
_UNKEPT = frozenset({"csrf", "confirm", "password"})


def _notice_text(notice: Any) -> str | None:
    return NOTICES.get(notice, notice) if isinstance(notice, str) and notice else None


def _flash_secret(request: web.Request) -> str | None:
    """What seals a flash: the session cookie once signed in, the sign-in form's CSRF cookie before."""
    return cookie(request, SESSION_COOKIE) or cookie(request, PRE_CSRF_COOKIE)


def _take_flash(request: web.Request) -> dict[str, Any] | None:
    value, secret = cookie(request, FLASH_COOKIE), _flash_secret(request)
    if not value or not secret:
        return None
    return open_flash(secret, value)


def see_other(
    request: web.Request,
    location: str,
    *,
    notice: str | None = None,
    error: SitecloudError | None = None,
    form: Mapping[str, Any] | None = None,
    **data: Any,
) -> web.HTTPSeeOther:
    """POST → 303 → GET: the next page shows ``notice`` or ``error`` once, ``form`` (the form as it
    was sent, but its secrets) as ``form``, and ``data`` in its context (a secret shown once). Raise it."""
    response = web.HTTPSeeOther(location)
    flash: dict[str, Any] = {}
    if notice:
        flash["notice"] = notice
    if error is not None:
        flash["error"] = {"message": error.message, "hint": error.hint}
    if form is not None:
        # Top level: a form too big for the cookie is dropped there, the error kept (_flash.py).
        flash["form"] = {k: v for k, v in form.items() if isinstance(v, str) and k not in _UNKEPT}
    if data:
        flash["data"] = data
    secret = _flash_secret(request)
    if flash and secret:
        response.set_cookie(
            FLASH_COOKIE,
            seal_flash(secret, flash),
            max_age=_FLASH_SECONDS,
            secure=True,
            httponly=True,
            path="/",
            samesite="Lax",
        )
    elif notice in NOTICES:
        # No session to seal with (just signed out): a fixed text by its key in the URL.
        response = web.HTTPSeeOther(f"{location}?n={notice}")
    return response


def redirect(location: str, notice: str | None = None) -> web.HTTPSeeOther:
    """A redirect that shows one of the fixed :data:`NOTICES` (by key, in the URL) on the next page."""
    return web.HTTPSeeOther(f"{location}?n={notice}" if notice else location)


def check_origin(request: web.Request) -> None:
    """Refuse a form posted from another origin (a second line of defence behind the CSRF token)."""
    origin = request.headers.get("Origin")
    if origin and origin != "null" and origin != f"{request.scheme}://{request.host}":
        raise Forbidden("this form was sent from another site", hint="reload the page and try again")


def cookie(request: web.Request, name: str) -> str | None:
    """One of our cookies; a value we could not have set (not printable ASCII) counts as none."""
    value = request.cookies.get(name)
    if value is None or not value.isascii() or not value.isprintable():
        return None
    return value


def check_csrf(page: Page, given: str | None) -> None:
    if not given or not given.isascii() or not secrets.compare_digest(page.csrf.encode(), given.encode()):
        raise Forbidden(
            "the form has expired or did not come from this portal", hint="reload the page and try again"
        )


async def posted(request: web.Request, page: Page) -> MultiDictProxy[Any]:
    """The form of a POST, after the origin and CSRF checks."""
    check_origin(request)
    form = await read_form(request)
    token = form.get("csrf")
    check_csrf(page, token if isinstance(token, str) else None)
    return form


async def read_form(request: web.Request) -> MultiDictProxy[Any]:
    """A POSTed form whose every text field can be stored (valid Unicode, no NUL)."""
    try:
        form = await request.post()
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(
            "the form could not be read", hint="send it as UTF-8 from the portal's page"
        ) from exc
    for name, value in form.items():
        if isinstance(value, str):
            check_text(name, "a form field's name")
            check_text(value, f"the form field {name!r}")
    return form


def confirm_page(
    request: web.Request,
    page: Page,
    *,
    title: str,
    consequences: Sequence[str],
    action: str,
    button: str,
    cancel: str,
    word: str | None = None,
    fields: dict[str, str] | None = None,
    items: Sequence[str] = (),
) -> web.Response:
    """The page that asks before a destructive POST: type ``word`` (content goes), or just confirm."""
    return render(
        request,
        "confirm.html",
        page=page,
        title=title,
        consequences=list(consequences),
        action=action,
        button=button,
        cancel=cancel,
        word=word,
        fields=fields or {},
        items=list(items),
    )


def check_confirmed(form: MultiDictProxy[Any], what: str, word: str | None = None) -> None:
    """A destructive form is carried out only as its confirmation page sends it."""
    given = form.get("confirm")
    if word is not None and given != word:
        raise ConfirmationRequired(
            f"type {word} to confirm that you want to {what}", hint="nothing was changed"
        )
    if word is None and given != "yes":
        raise ConfirmationRequired(
            f"confirm that you want to {what} on the page that asks", hint="nothing was changed"
        )
