"""Bounds on an app's response head, for every way the worker reads one (HTTP/1.1, FastCGI's CGI head).

An app is the tenant's code: a head that never ends (endless header lines, or one endless line)
would otherwise be held in the worker until it runs out of memory, taking every other site on it
down. A head past either bound fails the request (the visitor gets 502, the site's log says why) and
the connection to the app is closed, never kept for another request.

The platform's own header fields (``X-Sitecloud-*``) cross between front end and worker only: an
app is never told them (the version a front end holds of a file, the site's name it has as
``SITECLOUD_SITE``) nor may it say them.
"""

from __future__ import annotations

__all__ = [
    "MAX_HEAD_BYTES",
    "MAX_HEAD_FIELDS",
    "MAX_INTERIM_HEADS",
    "HeadBudget",
    "HeadTooLarge",
    "is_platform_field",
]

# Generous next to common proxies (nginx reads an upstream's head into 4 or 8 KB, HAProxy takes 101
# fields): a real app's head is a few hundred bytes.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEAD_FIELDS = 100
# Interim (1xx) heads before the answer: a real app sends one or two (100 Continue, 103 Early
# Hints). The worker drops them but parses each, in its own CPU outside the app's cgroup, so an app
# sending them without end would keep the worker busy for as long as the request may take.
MAX_INTERIM_HEADS = 16


_PLATFORM_PREFIX = b"x-sitecloud-"


def is_platform_field(name: bytes) -> bool:
    """Whether the (lower-case) field ``name`` is one of the platform's own, never an app's."""
    return name.startswith(_PLATFORM_PREFIX)


class HeadTooLarge(Exception):
    """An app's response head past :data:`MAX_HEAD_BYTES` or :data:`MAX_HEAD_FIELDS`; the message is
    the reason for the site's log."""

    @classmethod
    def over_bytes(cls) -> HeadTooLarge:
        return cls(f"the app's response head is too large (more than {MAX_HEAD_BYTES} bytes)")

    @classmethod
    def over_fields(cls) -> HeadTooLarge:
        return cls(f"the app's response head is too large (more than {MAX_HEAD_FIELDS} fields)")

    @classmethod
    def over_interim(cls) -> HeadTooLarge:
        return cls(f"the app sent more than {MAX_INTERIM_HEADS} interim (1xx) heads before its answer")


class HeadBudget:
    """What one response head (or one trailer section) has used of the bounds, field by field."""

    __slots__ = ("fields", "size")

    def __init__(self) -> None:
        self.fields = 0
        self.size = 0

    def add(self, name: bytes, value: bytes) -> None:
        """Count one field as it goes on the wire ("name: value" and its line end); raises
        :class:`HeadTooLarge` past a bound."""
        self.fields += 1
        self.size += len(name) + len(value) + 4
        if self.fields > MAX_HEAD_FIELDS:
            raise HeadTooLarge.over_fields()
        if self.size > MAX_HEAD_BYTES:
            raise HeadTooLarge.over_bytes()
