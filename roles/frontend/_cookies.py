"""An app's cookies stay on its own site: the one trust boundary for the ``Domain`` of a Set-Cookie.

Every site is ``<site>.<domain>``, so a cookie an app scopes to the platform's domain (or a parent of
it) would go to every other tenant's site, and to the portal: session fixation, cookie tossing.
Hosting platforms that can put their domain on the Public Suffix List have browsers refuse such a
cookie; ours may run under any domain, so the front end (which knows it) does it instead: the
attribute is dropped and the cookie becomes host-only, set for the host the visitor asked (RFC 6265
section 5.3 step 6). The app keeps working on its own host, which is all it could rightly reach.
A ``Domain`` of the site's own host name or of a custom hostname (or a parent of one that is not
the platform's) is left as it is.
"""

from __future__ import annotations

__all__ = ["site_scoped_cookie"]

# What a host name is made of once lower-cased (RFC 1123 letters, digits, hyphen; dots between labels).
_HOST_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-.")


def site_scoped_cookie(value: bytes, domain: bytes) -> bytes:
    """A Set-Cookie value without any ``Domain`` attribute that could reach the platform's other sites
    under ``domain`` (lower case, no trailing dot); ``value`` itself when it has none (most)."""
    if not domain or b";" not in value:
        return value
    parts = value.split(b";")
    kept = parts[:1]  # the name=value pair: a cookie named "Domain" is no attribute
    for attr in parts[1:]:
        name, eq, scope = attr.partition(b"=")
        if eq and name.strip(b" \t").lower() == b"domain" and _reaches_platform(scope, domain):
            continue
        kept.append(attr)
    return value if len(kept) == len(parts) else b";".join(kept)


def _reaches_platform(scope: bytes, domain: bytes) -> bool:
    """Whether a Domain attribute's value could cover ``domain``: equal to it or a parent of it, in any
    case, with leading or trailing dots (RFC 6265 section 5.2.3 drops one leading dot; some browsers
    take more), or in a form a browser might map onto it (non-ASCII that IDNA folds, escapes), which
    no real app's own host name needs."""
    name = scope.strip(b" \t").lower().strip(b".")
    if not name:
        return False  # an empty Domain is ignored by browsers (RFC 6265 section 5.2.3)
    if not _HOST_BYTES.issuperset(name):
        return True
    return domain == name or domain.endswith(b"." + name)
