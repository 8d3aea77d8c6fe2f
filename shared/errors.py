"""The one exception hierarchy of sitecloud.

Every error carries a stable ``code`` and a human ``message`` (plus an optional ``hint`` that says what
to do next). Each edge maps it: JSON ``{"error": {...}}`` with ``status`` at the HTTP APIs, ``ftp_code``
at the FTP server, a message and hint at the CLI. Internal calls carry the JSON form across the network,
and :func:`error_from_json` turns it back into the same class on the caller's side.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AlreadyExists",
    "BadRequest",
    "BuildFailed",
    "Changed",
    "ConfirmationRequired",
    "Forbidden",
    "InUse",
    "InvalidInput",
    "LimitReached",
    "NotFound",
    "NotServed",
    "NotSupported",
    "NothingPublished",
    "QuotaExceeded",
    "RateLimited",
    "SitecloudError",
    "StorageFull",
    "StorageUnavailable",
    "TooManyEntries",
    "Unauthorized",
    "Unavailable",
    "error_from_json",
]


class SitecloudError(Exception):
    """Base of every error sitecloud raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    ftp_code: ClassVar[int] = 451
    _by_code: ClassVar[dict[str, type[SitecloudError]]] = {}

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SitecloudError._by_code[cls.code] = cls

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        return {"error": body}

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class InvalidInput(SitecloudError):
    code = "invalid_input"
    status = 400
    ftp_code = 553


class BadRequest(SitecloudError):
    """A malformed request (HTTP framing, a bad zip, an unreadable body)."""

    code = "bad_request"
    status = 400
    ftp_code = 501


class Unauthorized(SitecloudError):
    code = "unauthorized"
    status = 401
    ftp_code = 530


class Forbidden(SitecloudError):
    code = "forbidden"
    status = 403
    ftp_code = 550


class ConfirmationRequired(SitecloudError):
    """A destructive action was asked for without the confirmation it needs (portal form, CLI prompt)."""

    code = "confirmation_required"
    status = 400
    ftp_code = 550


class NotFound(SitecloudError):
    code = "not_found"
    status = 404
    ftp_code = 550


class AlreadyExists(SitecloudError):
    code = "already_exists"
    status = 409
    ftp_code = 550


class LimitReached(SitecloudError):
    """A plan limit other than storage (max sites, max hostnames, ...)."""

    code = "limit_reached"
    status = 409
    ftp_code = 550


class QuotaExceeded(SitecloudError):
    """The write would take the site past its storage quota."""

    code = "quota_exceeded"
    status = 413
    ftp_code = 552


class TooManyEntries(SitecloudError):
    """The write would take the site past the files and folders a site may hold."""

    code = "too_many_entries"
    status = 413
    ftp_code = 552  # RFC 959: exceeded storage allocation


class InUse(SitecloudError):
    """It cannot go while something else still uses it (a plan with subscriptions)."""

    code = "in_use"
    status = 409
    ftp_code = 550


class Changed(SitecloudError):
    """What the request was made against changed meanwhile (a site published to since)."""

    code = "changed"
    status = 409
    ftp_code = 450


class NothingPublished(SitecloudError):
    """What the request would put in front of visitors has nothing published yet (an empty slot)."""

    code = "nothing_published"
    status = 409
    ftp_code = 550


class NotSupported(SitecloudError):
    """The request is understood but this cloud cannot do it (yet), e.g. on its current fabric."""

    code = "not_supported"
    status = 409
    ftp_code = 502


class RateLimited(SitecloudError):
    """Too many attempts (e.g. failed sign-ins); the hint says when to try again, and ``retry_after``
    (seconds) becomes the answer's Retry-After where the caller answers over HTTP."""

    code = "rate_limited"
    status = 429
    ftp_code = 421

    def __init__(self, message: str, *, hint: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class BuildFailed(SitecloudError):
    """The content is stored, but what it asks to be built (its requirements.txt or package.json)
    could not be; the message ends with the build's own error lines."""

    code = "build_failed"
    status = 422
    ftp_code = 451


class Unavailable(SitecloudError):
    """A role or dependency cannot be reached now; retrying later may work. ``retry_after``
    (seconds), where known, becomes the answer's Retry-After where the caller answers over HTTP."""

    code = "unavailable"
    status = 503
    ftp_code = 421

    def __init__(self, message: str, *, hint: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class NotServed(Unavailable):
    """The content is stored, but no worker of the site's serves it: none is running, or none can be
    reached. It serves as soon as one is back."""

    code = "not_served"


class StorageUnavailable(Unavailable):
    """The content store (the fileserver) is stopped or cannot be reached: publishing waits for it.

    FTP answers 451 (RFC 959: action aborted, local error) and keeps the session, where a 421 would
    close it: the client retries the command, not the login."""

    code = "storage_unavailable"
    ftp_code = 451

    def __init__(
        self, message: str = "storage is unavailable, try again later", *, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)


class StorageFull(SitecloudError):
    """A role's disk (the fileserver's, where content is stored) has no space left: nothing was stored.
    Not the site's quota: it clears once the admin frees or adds disk, and the same write may then be
    retried as it is."""

    code = "storage_full"
    status = 507  # RFC 4918: Insufficient Storage
    ftp_code = 452  # RFC 959: insufficient storage space in system


SitecloudError._by_code[SitecloudError.code] = SitecloudError


def error_from_json(status: int, body: Any) -> SitecloudError:
    """Rebuild the error an internal or public API answered with."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        return (
            Unavailable(f"unexpected answer (HTTP {status})")
            if status >= 500
            else BadRequest(f"unexpected answer (HTTP {status})")
        )
    cls = SitecloudError._by_code.get(str(detail.get("code")), SitecloudError)
    hint = detail.get("hint")
    return cls(str(detail.get("message", "")), hint=str(hint) if hint else None)
