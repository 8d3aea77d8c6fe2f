"""What a page shows once, across POST → 303 → GET: a notice, an error with the form as it was sent, a
secret shown only this once (a new password or token).

It travels in a short-lived cookie sealed with AES-GCM under a key derived from the browser's own
session cookie (or, before sign-in, its CSRF cookie): the page's HTML and the runtime DB cannot open
it, another browser cannot either, and nobody can forge one. The GET that shows it deletes it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["FLASH_COOKIE", "open_flash", "seal_flash"]

FLASH_COOKIE = "__Host-sitecloud_flash"
# Browsers keep cookies up to 4096 bytes; a form too big to carry back is dropped, the message kept.
_MAX_COOKIE = 3800
# An error message is not cut shorter than this to fit.
_MIN_MESSAGE = 200
_CONTEXT = b"sitecloud portal flash v1"


def _key(secret: str) -> bytes:
    return hmac.new(secret.encode(), _CONTEXT, hashlib.sha256).digest()


def seal_flash(secret: str, data: dict[str, Any]) -> str:
    def sealed(d: dict[str, Any]) -> str:
        nonce = os.urandom(12)
        box = AESGCM(_key(secret)).encrypt(nonce, json.dumps(d, separators=(",", ":")).encode(), _CONTEXT)
        return base64.urlsafe_b64encode(nonce + box).decode().rstrip("=")

    value = sealed(data)
    if len(value) > _MAX_COOKIE and "form" in data:
        data = {k: v for k, v in data.items() if k != "form"}
        value = sealed(data)
    # A cookie past the bound is dropped by the browser, error and all: a long one (a failed build's
    # lines) is cut instead, its start kept.
    error = data.get("error")
    while (
        len(value) > _MAX_COOKIE and isinstance(error, dict) and len(str(error.get("message"))) > _MIN_MESSAGE
    ):
        message = str(error["message"])
        error = {**error, "message": message[: len(message) // 2].rstrip() + " …"}
        data = {**data, "error": error}
        value = sealed(data)
    return value


def open_flash(secret: str, value: str) -> dict[str, Any] | None:
    """The flash sealed under ``secret``, or None if it is not one (another session's, altered, stale)."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        if len(raw) < 12 + 16:
            return None
        plain = AESGCM(_key(secret)).decrypt(raw[:12], raw[12:], _CONTEXT)
        data = json.loads(plain)
    except (binascii.Error, ValueError, InvalidTag):
        return None
    return data if isinstance(data, dict) else None
