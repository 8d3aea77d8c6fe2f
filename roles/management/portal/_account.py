"""Sign-in, sign-up, sign-out and the API tokens page (admins and tenants alike)."""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web

from roles.management._request import client_address, service_of
from roles.management.api import RESET_PATH
from roles.management.portal._web import (
    PRE_CSRF_COOKIE,
    SESSION_COOKIE,
    check_confirmed,
    check_origin,
    confirm_page,
    cookie,
    current_page,
    posted,
    read_form,
    redirect,
    render,
    require_page,
    see_other,
)
from roles.management.service import Principal
from shared.errors import Forbidden, InvalidInput, NotFound, SitecloudError

__all__ = ["account_routes"]

_COOKIE_FLAGS = {"secure": True, "httponly": True, "path": "/"}


def _home(who: Principal) -> str:
    return "/admin/" if who.is_admin else "/portal/"


async def root(request: web.Request) -> web.StreamResponse:
    page = await current_page(request)
    raise web.HTTPSeeOther(_home(page.who) if page else "/signin")


def _pre_csrf(request: web.Request) -> str:
    return cookie(request, PRE_CSRF_COOKIE) or secrets.token_urlsafe(32)


def _anonymous(
    request: web.Request,
    template: str,
    *,
    status: int = 200,
    error: SitecloudError | None = None,
    **ctx: Any,
) -> web.Response:
    token = _pre_csrf(request)
    response = render(request, template, page=None, status=status, error=error, csrf=token, **ctx)
    # Strict: this cookie only ever needs to come back from our own forms.
    response.set_cookie(PRE_CSRF_COOKIE, token, samesite="Strict", **_COOKIE_FLAGS)  # type: ignore[arg-type]
    return response


async def _anonymous_form(request: web.Request) -> dict[str, str]:
    check_origin(request)
    form = await read_form(request)
    given, expected = form.get("csrf"), cookie(request, PRE_CSRF_COOKIE)
    if (
        not isinstance(given, str)
        or not expected
        or not secrets.compare_digest(given.encode(), expected.encode())
    ):
        raise Forbidden(
            "the form has expired or did not come from this portal", hint="reload the page and try again"
        )
    return {k: v for k, v in form.items() if isinstance(v, str)}


async def _signed_in(request: web.Request, who: Principal) -> web.StreamResponse:
    cookie, _ = await service_of(request).create_session(who)
    response = web.HTTPSeeOther(_home(who))
    response.set_cookie(SESSION_COOKIE, cookie, samesite="Lax", max_age=12 * 3600, **_COOKIE_FLAGS)  # type: ignore[arg-type]
    response.del_cookie(PRE_CSRF_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    return response


async def signin_form(request: web.Request) -> web.StreamResponse:
    page = await current_page(request)
    if page is not None:
        raise web.HTTPSeeOther(_home(page.who))
    settings = await service_of(request).get_settings()
    return _anonymous(request, "signin.html", signup=settings["signup_enabled"], username="")


async def signin(request: web.Request) -> web.StreamResponse:
    form = await _anonymous_form(request)
    username = form.get("username", "").strip()
    try:
        who = await service_of(request).sign_in(username, form.get("password", ""), client_address(request))
    except SitecloudError as err:
        raise see_other(request, "/signin", error=err, username=username) from None
    return await _signed_in(request, who)


async def signup_form(request: web.Request) -> web.StreamResponse:
    settings = await service_of(request).get_settings()
    return _anonymous(request, "signup.html", open=settings["signup_enabled"], username="")


async def signup(request: web.Request) -> web.StreamResponse:
    form = await _anonymous_form(request)
    username, password = form.get("username", "").strip(), form.get("password", "")
    service = service_of(request)
    try:
        if password != form.get("confirm", ""):
            raise InvalidInput("the two passwords differ")
        await service.sign_up({"username": username, "password": password})
        who = await service.sign_in(username, password, client_address(request))
    except SitecloudError as err:
        raise see_other(request, "/signup", error=err, username=username) from None
    return await _signed_in(request, who)


async def signout(request: web.Request) -> web.StreamResponse:
    page = await require_page(request)
    await posted(request, page)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        await service_of(request).end_session(cookie)
    response = redirect("/signin", "signed-out")
    response.del_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="Lax")
    return response


async def forgot_password(request: web.Request) -> web.StreamResponse:
    return render(request, "forgot.html", page=await current_page(request))


async def reset_form(request: web.Request) -> web.StreamResponse:
    """The page a reset link opens: choose a new password (or why the link does not work)."""
    token = request.match_info["token"]
    try:
        username = await service_of(request).reset_username(token)
    except NotFound as err:
        return _anonymous(request, "reset_password.html", status=404, error=err, username="", action="")
    return _anonymous(request, "reset_password.html", username=username, action=f"{RESET_PATH}/{token}")


async def reset_password(request: web.Request) -> web.StreamResponse:
    form = await _anonymous_form(request)
    token = request.match_info["token"]
    password = form.get("password", "")
    try:
        if password != form.get("confirm", ""):
            raise InvalidInput("the two passwords differ", hint="type the same new password twice")
        await service_of(request).use_reset(token, password)
    except SitecloudError as err:
        raise see_other(request, f"{RESET_PATH}/{token}", error=err) from None
    raise see_other(request, "/signin", notice="password-set")


_TOKENS = "/account/tokens"


async def tokens_page(request: web.Request) -> web.StreamResponse:
    page = await require_page(request)
    tokens = await service_of(request).list_tokens(page.who)
    return render(request, "tokens.html", page=page, tokens=tokens["tokens"], new=None)


async def create_token(request: web.Request) -> web.StreamResponse:
    page = await require_page(request)
    form = await posted(request, page)
    try:
        new = await service_of(request).create_token(page.who, {"name": str(form.get("name", "")).strip()})
    except SitecloudError as err:
        raise see_other(request, _TOKENS, error=err) from None
    # The token is shown once, on the page this redirect leads to.
    raise see_other(
        request, _TOKENS, notice="token-created", new={"name": new["name"], "token": new["token"]}
    )


async def confirm_revoke_token(request: web.Request) -> web.StreamResponse:
    page = await require_page(request)
    token_id = int(request.match_info["id"])
    tokens = (await service_of(request).list_tokens(page.who))["tokens"]
    token = next((t for t in tokens if t["id"] == token_id), None)
    if token is None:
        raise NotFound(f"no token {token_id}", hint="see the list of API tokens")
    return confirm_page(
        request,
        page,
        title=f"Revoke token {token['name']}?",
        consequences=["Whatever uses this token (scripts, the command line) loses access at once."],
        action=f"{_TOKENS}/{token_id}/revoke",
        button=f"Revoke {token['name']}",
        cancel=_TOKENS,
    )


async def revoke_token(request: web.Request) -> web.StreamResponse:
    page = await require_page(request)
    form = await posted(request, page)
    try:
        check_confirmed(form, "revoke this token")
        await service_of(request).revoke_token(page.who, int(request.match_info["id"]))
    except SitecloudError as err:
        raise see_other(request, _TOKENS, error=err) from None
    raise see_other(request, _TOKENS, notice="token-revoked")


def account_routes() -> list[web.RouteDef]:
    return [
        web.get("/", root),
        web.get("/signin", signin_form),
        web.post("/signin", signin),
        web.get("/signup", signup_form),
        web.post("/signup", signup),
        web.post("/signout", signout),
        web.get("/forgot-password", forgot_password),
        # Tokens are secrets.token_urlsafe(32): 43 characters of the URL-safe base64 alphabet.
        web.get(RESET_PATH + r"/{token:[A-Za-z0-9_-]{20,64}}", reset_form),
        web.post(RESET_PATH + r"/{token:[A-Za-z0-9_-]{20,64}}", reset_password),
        web.get("/account/tokens", tokens_page),
        web.post("/account/tokens", create_token),
        web.get(r"/account/tokens/{id:\d{1,9}}/revoke", confirm_revoke_token),
        web.post(r"/account/tokens/{id:\d{1,9}}/revoke", revoke_token),
    ]
