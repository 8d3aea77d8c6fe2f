"""People and their credentials: users, sign-up and sign-in, portal sessions, API tokens, cloud settings.

Passwords are scrypt hashes (:mod:`shared.credentials`); tokens and session cookies are random and only
their SHA-256 is stored. Failed sign-ins are limited per user name and per client address.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import hmac
import secrets
import threading
import time
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from roles.management._domains import check_ip_dns_services, parse_resolvers
from roles.management._paging import Page
from roles.management._store import Principal, iso, require_admin
from shared.acme import LETSENCRYPT, AcmeSettings, check_ca_bundle, check_directory_url, check_email
from shared.credentials import hash_password, hash_token, new_password, new_token, verify_password
from shared.db import (
    ApiToken,
    Database,
    PasswordReset,
    PortalSession,
    Setting,
    Tenant,
    User,
    bump_generation,
)
from shared.dns01 import (
    RECORD_KEY,
    TSIG_ALGORITHMS,
    Dns01Settings,
    check_key_name,
    check_secret,
    check_update_server,
    check_zone,
    wildcard_view,
)
from shared.errors import AlreadyExists, Forbidden, InvalidInput, NotFound, RateLimited, Unauthorized
from shared.names import DEFAULT_IP_DNS_SERVICES, validate_name

__all__ = ["MAX_PASSWORD", "MIN_PASSWORD", "Accounts", "SignInLimiter"]

Json = dict[str, Any]

SESSION_LIFETIME = dt.timedelta(hours=12)
# A password reset link works once, for this long.
RESET_LIFETIME = dt.timedelta(hours=1)
MIN_PASSWORD = 10
MAX_PASSWORD = 256
# Settings an admin may change, and their defaults.
SETTINGS_DEFAULTS: Json = {
    "signup_enabled": False,
    # Where custom hostname ownership is checked: "ip" or "ip:port" entries; empty is the system's resolvers.
    "dns_resolvers": [],
    # Wildcard DNS services that resolve names to the IP they embed; no custom hostname may be under one.
    "ip_dns_services": list(DEFAULT_IP_DNS_SERVICES),
    # The ACME directory the controller orders custom hostnames' certificates from ("" = ACME off).
    "acme_directory_url": LETSENCRYPT,
    # PEM certificates to trust for that directory's HTTPS (a test CA); "" = the system's.
    "acme_ca_bundle": "",
    # Given to the CA as the account's contact (expiry notices); "" = none.
    "acme_email": "",
    # The platform's wildcard *.<domain> from the ACME directory by DNS-01, through the DNS update
    # method below (RFC 2136 updates signed with a TSIG key); off: the cloud CA's wildcard is served.
    "wildcard_dns01": False,
    "dns_update_server": "",
    "dns_update_zone": "",
    "dns_update_key_name": "",
    "dns_update_key_algorithm": "hmac-sha256",
    # Write-only: answers say whether it is set, never what it is.
    "dns_update_key_secret": "",
}
_SECRETS = ("dns_update_key_secret",)
# Changing these changes what the front ends serve (the ACME wildcard or not).
_WILDCARD_SWITCHES = ("wildcard_dns01", "acme_directory_url")


@functools.cache
def _dummy_hash() -> str:
    """A hash to check a wrong user's password against, so that an unknown name costs as long as a
    known one. Made on first use: hashing takes tens of milliseconds, every start would pay them."""
    return hash_password(secrets.token_urlsafe(16))


_ALL = Page()
# last_used_at is written at most this often per token: not one DB write per request.
_TOUCH_EVERY = dt.timedelta(minutes=1)


def _check_algorithm(value: object) -> str:
    text = value.strip().lower() if isinstance(value, str) else ""
    if text not in TSIG_ALGORITHMS:
        raise InvalidInput(
            f"TSIG algorithm {value!r} is not supported", hint=f"one of {', '.join(TSIG_ALGORITHMS)}"
        )
    return text


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _text(body: Json, key: str) -> str:
    value = body.get(key)
    return value if isinstance(value, str) else ""


def _password(body: Json, key: str = "password") -> str:
    value = body.get(key)
    if not isinstance(value, str) or not MIN_PASSWORD <= len(value) <= MAX_PASSWORD:
        raise InvalidInput(f"a password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return value


class SignInLimiter:
    """At most ``per_user`` failures per user name and ``per_client`` per address in ``window`` seconds.

    In memory, per management process: enough to make guessing slow; a restart forgives.
    """

    def __init__(self, *, per_user: int = 5, per_client: int = 20, window: float = 300.0) -> None:
        self._limits = {"user": per_user, "client": per_client}
        self._window = window
        self._failures: dict[tuple[str, str], collections.deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> collections.deque[float]:
        q = self._failures.setdefault(key, collections.deque())
        while q and q[0] <= now - self._window:
            q.popleft()
        return q

    def check(self, username: str, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (("user", username.lower()), ("client", client)):
                q = self._recent(key, now)
                if len(q) >= self._limits[key[0]]:
                    wait = int(q[0] + self._window - now) + 1
                    raise RateLimited("too many failed sign-ins", hint=f"try again in {wait} seconds")

    def failed(self, username: str, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (("user", username.lower()), ("client", client)):
                self._recent(key, now).append(now)

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(("user", username.lower()), None)


def _user_json(user: User, tenant: str | None) -> Json:
    return {
        "id": user.id,
        "username": user.username,
        "admin": user.tenant_id is None,
        "tenant": tenant,
        "created_at": iso(user.created_at),
        "last_sign_in_at": iso(user.last_sign_in_at),
    }


def _token_json(row: ApiToken) -> Json:
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "created_at": iso(row.created_at),
        "last_used_at": iso(row.last_used_at),
    }


class Accounts:
    def __init__(
        self,
        db: Database,
        lock: threading.Lock,
        limiter: SignInLimiter | None = None,
        *,
        domain: str = "sites.localhost",
    ) -> None:
        self._db = db
        self._domain = domain
        self._write_lock = lock
        self.limiter = limiter or SignInLimiter()

    # -- principals

    def _principal(self, s: Any, user_id: int | None, tenant_id: int | None) -> Principal:
        tenant = s.get(Tenant, tenant_id) if tenant_id is not None else None
        user = s.get(User, user_id) if user_id is not None else None
        return Principal(
            tenant_id,
            tenant.name if tenant else None,
            user.id if user else None,
            user.username if user else None,
        )

    def authenticate(self, token: str) -> Principal:
        with self._db.session() as s:
            row = s.execute(
                select(ApiToken).where(ApiToken.token_hash == hash_token(token))
            ).scalar_one_or_none()
            if row is None:
                raise Unauthorized("the token is not valid", hint="check --token or SITECLOUD_TOKEN")
            now = _now()
            if row.last_used_at is None or _aware(row.last_used_at) < now - _TOUCH_EVERY:
                row.last_used_at = now
            return self._principal(s, row.user_id, row.tenant_id)

    # -- users

    def create_user(self, who: Principal, body: Json) -> Json:
        """An admin account (no ``tenant``) or a user of an existing tenant; the password is generated
        when not given and shown in this answer only."""
        require_admin(who)
        unknown = set(body) - {"username", "password", "tenant"}
        if unknown:
            raise InvalidInput(f"unknown field(s) for a user: {', '.join(sorted(unknown))}")
        username = validate_name(_text(body, "username"), what="user")
        generated = "password" not in body or body["password"] is None
        password = new_password() if generated else _password(body)
        tenant_name = body.get("tenant")
        if tenant_name is not None and not isinstance(tenant_name, str):
            raise InvalidInput("'tenant' must be a tenant name")
        password_hash = hash_password(password)
        with self._write_lock, self._db.session() as s:
            tenant = None
            if tenant_name is not None:
                tenant = s.execute(select(Tenant).where(Tenant.name == tenant_name)).scalar_one_or_none()
                if tenant is None:
                    raise NotFound(f"no tenant {tenant_name!r}", hint="see the list of tenants")
            if s.execute(select(User.id).where(User.username == username)).first():
                raise AlreadyExists(f"user {username!r} already exists")
            user = User(
                username=username, password_hash=password_hash, tenant_id=tenant.id if tenant else None
            )
            s.add(user)
            s.flush()
            answer = _user_json(user, tenant.name if tenant else None)
        if generated:
            answer["password"] = password
        return answer

    def list_users(self, who: Principal, page: Page = _ALL, *, tenant: str | None = None) -> Json:
        require_admin(who)
        with self._db.session() as s:
            query = (
                select(User, Tenant.name)
                .outerjoin(Tenant, User.tenant_id == Tenant.id)
                .order_by(User.username)
            )
            if tenant is not None:
                query = query.where(Tenant.name == tenant)
            after = page.after(str)
            if after is not None:
                query = query.where(User.username > after)
            if page.limit is not None:
                query = query.limit(page.limit + 1)
            rows, cursor = page.cut(list(s.execute(query).tuples()), lambda row: row[0].username)
            return {"users": [_user_json(u, t) for u, t in rows], "next_cursor": cursor}

    def sign_up(self, body: Json) -> Json:
        """A new tenant and its first user, when the admin allows sign-up."""
        if not self.get_settings()["signup_enabled"]:
            raise Forbidden("sign-up is closed on this cloud", hint="ask the hosting admin for an account")
        unknown = set(body) - {"username", "password"}
        if unknown:
            raise InvalidInput(f"unknown field(s) for a sign-up: {', '.join(sorted(unknown))}")
        username = validate_name(_text(body, "username"), what="user")
        password_hash = hash_password(_password(body))
        with self._write_lock, self._db.session() as s:
            taken = (
                s.execute(select(User.id).where(User.username == username)).first()
                or s.execute(select(Tenant.id).where(Tenant.name == username)).first()
            )
            if taken:
                raise AlreadyExists(f"the name {username!r} is taken", hint="choose another user name")
            tenant = Tenant(name=username)
            s.add(tenant)
            s.flush()
            user = User(username=username, password_hash=password_hash, tenant_id=tenant.id)
            s.add(user)
            s.flush()
            bump_generation(s)
            return _user_json(user, tenant.name)

    def sign_in(self, username: str, password: str, client: str) -> Principal:
        """Check a user name and password; failures count against both the name and the client."""
        self.limiter.check(username, client)
        with self._db.session() as s:
            user = s.execute(select(User).where(User.username == username)).scalar_one_or_none()
            ok = verify_password(password, user.password_hash if user else _dummy_hash())
            if user is None or not ok:
                self.limiter.failed(username, client)
                raise Unauthorized("wrong user name or password")
            user.last_sign_in_at = _now()
            self.limiter.succeeded(username)
            return self._principal(s, user.id, user.tenant_id)

    # -- password resets: there is no mail to send a link by, so an admin hands the user one

    def issue_reset(self, who: Principal, username: str) -> Json:
        """A one-time token with which ``username`` sets a new password within the hour (admin). An
        earlier link of the same user stops working; the current password works until the link is used."""
        require_admin(who)
        token = secrets.token_urlsafe(32)
        expires = _now() + RESET_LIFETIME
        with self._write_lock, self._db.session() as s:
            user = s.execute(select(User).where(User.username == username)).scalar_one_or_none()
            if user is None:
                raise NotFound(f"no user {username!r}", hint="see the list of users")
            s.execute(delete(PasswordReset).where(PasswordReset.user_id == user.id))
            s.add(PasswordReset(token_hash=hash_token(token), user_id=user.id, expires_at=expires))
        return {"username": username, "token": token, "expires_at": iso(expires)}

    def _live_reset(self, s: Session, token: str) -> PasswordReset:
        row = s.execute(
            select(PasswordReset).where(PasswordReset.token_hash == hash_token(token))
        ).scalar_one_or_none()
        if row is None or row.used_at is not None or _aware(row.expires_at) < _now():
            raise NotFound(
                "this password reset link does not work: it was used already, it expired, or it was "
                "never issued",
                hint="ask your hosting provider's admin for a new link",
            )
        return row

    def reset_username(self, token: str) -> str:
        """Whose password a live reset token sets (NotFound if it does not work)."""
        with self._db.session() as s:
            user = s.get(User, self._live_reset(s, token).user_id)
            if user is None:
                raise NotFound("this password reset link does not work")
            return user.username

    def use_reset(self, token: str, password: str) -> str:
        """Set the new password and spend the token; every session of the user ends."""
        password_hash = hash_password(_password({"password": password}))
        now = _now()
        with self._write_lock, self._db.session() as s:
            row = self._live_reset(s, token)
            user = s.get(User, row.user_id)
            if user is None:
                raise NotFound("this password reset link does not work")
            user.password_hash = password_hash
            row.used_at = now
            s.execute(delete(PortalSession).where(PortalSession.user_id == user.id))
            return user.username

    # -- portal sessions

    def create_session(self, who: Principal) -> tuple[str, str]:
        """A new session for a signed-in user: (cookie value, CSRF token)."""
        assert who.user_id is not None
        cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = _now()
        with self._db.session() as s:
            s.execute(delete(PortalSession).where(PortalSession.expires_at < now))
            s.add(
                PortalSession(
                    session_hash=hash_token(cookie),
                    user_id=who.user_id,
                    csrf_token=csrf,
                    expires_at=now + SESSION_LIFETIME,
                )
            )
        return cookie, csrf

    def session(self, cookie: str) -> tuple[Principal, str] | None:
        """The principal and CSRF token of a live session, or None."""
        with self._db.session() as s:
            row = s.execute(
                select(PortalSession).where(PortalSession.session_hash == hash_token(cookie))
            ).scalar_one_or_none()
            if row is None or _aware(row.expires_at) < _now():
                return None
            user = s.get(User, row.user_id)
            if user is None:
                return None
            return self._principal(s, user.id, user.tenant_id), row.csrf_token

    def end_session(self, cookie: str) -> None:
        with self._db.session() as s:
            s.execute(delete(PortalSession).where(PortalSession.session_hash == hash_token(cookie)))

    @staticmethod
    def csrf_ok(expected: str, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())

    # -- API tokens

    def _owned(self, who: Principal) -> Any:
        """The tokens a principal may see: its user's, or (for user-less tokens) its tenant's or the
        admins' that belong to no user."""
        if who.user_id is not None:
            return ApiToken.user_id == who.user_id
        if who.tenant_id is None:
            return (ApiToken.tenant_id.is_(None)) & (ApiToken.user_id.is_(None))
        return (ApiToken.tenant_id == who.tenant_id) & (ApiToken.user_id.is_(None))

    def create_token(self, who: Principal, body: Json) -> Json:
        unknown = set(body) - {"name"}
        if unknown:
            raise InvalidInput(f"unknown field(s) for a token: {', '.join(sorted(unknown))}")
        name = validate_name(_text(body, "name"), what="token")
        token = new_token()
        with self._write_lock, self._db.session() as s:
            count = s.scalar(select(func.count(ApiToken.id)).where(self._owned(who))) or 0
            if count >= 50:
                raise InvalidInput("at most 50 tokens per user", hint="revoke tokens you no longer use")
            row = ApiToken(
                token_hash=hash_token(token),
                name=name,
                tenant_id=who.tenant_id,
                user_id=who.user_id,
                prefix=token[:8],
            )
            s.add(row)
            s.flush()
            return {**_token_json(row), "token": token}

    def list_tokens(self, who: Principal, page: Page = _ALL) -> Json:
        with self._db.session() as s:
            query = select(ApiToken).where(self._owned(who)).order_by(ApiToken.id)
            after = page.after(int)
            if after is not None:
                query = query.where(ApiToken.id > after)
            if page.limit is not None:
                query = query.limit(page.limit + 1)
            rows, cursor = page.cut(list(s.scalars(query)), lambda r: r.id)
            return {"tokens": [_token_json(r) for r in rows], "next_cursor": cursor}

    def revoke_token(self, who: Principal, token_id: int) -> None:
        with self._write_lock, self._db.session() as s:
            row = s.execute(
                select(ApiToken).where(ApiToken.id == token_id, self._owned(who))
            ).scalar_one_or_none()
            if row is None:
                raise NotFound(f"no token {token_id}", hint="see the list of API tokens")
            s.delete(row)

    # -- cloud settings

    def _stored_settings(self) -> Json:
        with self._db.session() as s:
            return {r.key: r.value.get("value") for r in s.scalars(select(Setting))}

    def get_settings(self) -> Json:
        rows = self._stored_settings()
        values = {k: rows.get(k, default) for k, default in SETTINGS_DEFAULTS.items()}
        for key in _SECRETS:
            values[f"{key}_set"] = bool(values.pop(key))
        values["wildcard_certificate"] = wildcard_view(
            rows.get(RECORD_KEY),
            Dns01Settings.from_settings(rows),
            AcmeSettings.from_settings(rows).enabled,
            self._domain,
        )
        return values

    def _check_wildcard(self, merged: Json) -> None:
        """Turning the wildcard on needs the whole update method, and ACME on."""
        if merged.get("wildcard_dns01") is not True:
            return
        missing = [
            f"'{k}'"
            for k in ("dns_update_server", "dns_update_zone", "dns_update_key_name", "dns_update_key_secret")
            if not merged.get(k)
        ]
        if missing:
            raise InvalidInput(
                f"the wildcard by DNS-01 needs a DNS update method: {', '.join(missing)} not set",
                hint="set the update server, zone, TSIG key name and secret (and algorithm) with it",
            )
        if not AcmeSettings.from_settings(merged).enabled:
            raise InvalidInput(
                "the wildcard by DNS-01 needs an ACME directory, and ACME is off",
                hint="set 'acme_directory_url' (letsencrypt, letsencrypt-staging or a URL) first",
            )
        check_zone(merged.get("dns_update_zone"), self._domain)

    def update_settings(self, who: Principal, body: Json) -> Json:
        require_admin(who)
        unknown = set(body) - set(SETTINGS_DEFAULTS)
        if unknown:
            raise InvalidInput(
                f"unknown setting(s): {', '.join(sorted(unknown))}",
                hint=f"known: {', '.join(SETTINGS_DEFAULTS)}",
            )
        for key, value in body.items():
            if not isinstance(value, type(SETTINGS_DEFAULTS[key])):
                raise InvalidInput(f"{key!r} must be {type(SETTINGS_DEFAULTS[key]).__name__}")
        checks = {
            "ip_dns_services": check_ip_dns_services,
            "acme_directory_url": check_directory_url,
            "acme_ca_bundle": check_ca_bundle,
            "acme_email": check_email,
            "dns_update_server": check_update_server,
            "dns_update_zone": lambda v: check_zone(v, self._domain),
            "dns_update_key_name": check_key_name,
            "dns_update_key_algorithm": _check_algorithm,
            "dns_update_key_secret": check_secret,
        }
        if "dns_resolvers" in body:
            parse_resolvers(body["dns_resolvers"])
        body = {key: checks[key](value) if key in checks else value for key, value in body.items()}
        with self._write_lock, self._db.session() as s:
            stored = {r.key: r.value.get("value") for r in s.scalars(select(Setting))}
            self._check_wildcard({**SETTINGS_DEFAULTS, **stored, **body})
            for key, value in body.items():
                row = s.get(Setting, key)
                if row is None:
                    s.add(Setting(key=key, value={"value": value}))
                else:
                    row.value = {"value": value}
            if any(key in body and body[key] != stored.get(key) for key in _WILDCARD_SWITCHES):
                bump_generation(s)  # the front ends take up (or put down) the ACME wildcard
        return self.get_settings()

    def issue_token(self, username: str, password: str, name: str, client: str) -> Json:
        """Sign in with a password and get an API token (``sitecloud login``)."""
        who = self.sign_in(username, password, client)
        return self.create_token(who, {"name": name})
