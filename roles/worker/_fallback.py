"""What a static site answers for a path with no file: its own 404 page, or a single-page app's page.

A site generator makes a ``404.html`` (Hugo, Jekyll, Eleventy), and GitHub Pages, Netlify and
Cloudflare Pages serve it for a missing page; a single-page app (React, Vue, Angular built to static
files) routes ``/dashboard/settings`` in the browser, so a reload there must get its ``index.html``.
Azure Static Web Apps says both in ``staticwebapp.config.json`` at the site's root:

- ``navigationFallback.rewrite``: the page any path with no file gets, with 200, but paths that match
  one of ``navigationFallback.exclude`` (globs such as ``/images/*.{png,jpg}``);
- ``responseOverrides."404".rewrite``: the page a missing path gets, with 404.

Without that file, the conventions: ``200.html`` (surge.sh's) for routes (a last segment with no
extension: a missing image stays a 404), and ``404.html``. Read once per version (small files, from
its directory or packs); a config that is not valid JSON, too large, or names a page the version does
not have is ignored, as if it were not there; its exclude globs are cut to 64 (each miss is matched
against them on the worker's loop).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from typing import Any

from roles.worker._packs import VersionFiles
from roles.worker._static import FileHit, inside_web, read_small, resolve
from shared.errors import InvalidInput
from shared.paths import site_relpath

__all__ = ["NO_FALLBACKS", "SWA_CONFIG", "Fallbacks", "fallback_for", "fallbacks", "page_hit"]

SWA_CONFIG = "staticwebapp.config.json"
_CONFIG_MAX = 64 * 1024
# Every miss is matched against the exclude globs, on the worker's loop: a bounded few, each short.
_EXCLUDES_MAX = 64
_EXCLUDE_CHARS = 256
_BRACES = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True, slots=True)
class Fallbacks:
    # The page (a path in the version) a path with no file gets with 200 ("": none).
    navigation: str = ""
    # Visitor paths the navigation page is not for (globs), or, when None, any path whose last
    # segment has an extension (the 200.html convention).
    exclude: tuple[str, ...] | None = None
    # The page a missing path gets with 404 ("": the platform's).
    not_found: str = ""


NO_FALLBACKS = Fallbacks()


def fallbacks(root: str, web: str, packed: VersionFiles | None) -> Fallbacks:
    """A version's fallback pages (see the module's doc)."""
    navigation = not_found = ""
    exclude: tuple[str, ...] | None = None
    config = _config(root, web, packed)
    nav = config.get("navigationFallback")
    if isinstance(nav, dict):
        navigation = _page(root, web, packed, nav.get("rewrite"))
        raw = nav.get("exclude", [])
        if navigation and isinstance(raw, list):
            globs = [g for g in raw if isinstance(g, str) and len(g) <= _EXCLUDE_CHARS]
            exclude = tuple(p for g in globs for p in _expand(g))[:_EXCLUDES_MAX]
    overrides = config.get("responseOverrides")
    if isinstance(overrides, dict) and isinstance(overrides.get("404"), dict):
        not_found = _page(root, web, packed, overrides["404"].get("rewrite"))
    if not navigation:
        navigation = _page(root, web, packed, "/200.html")
    if not not_found:
        not_found = _page(root, web, packed, "/404.html")
    if not navigation and not not_found:
        return NO_FALLBACKS
    return Fallbacks(navigation, exclude, not_found)


def fallback_for(found: Fallbacks, path: str, rel: str) -> tuple[int, str] | None:
    """(status, page) for a visitor's ``path`` (``rel`` through site_relpath) that names no file."""
    if found.navigation:
        if found.exclude is None:
            routed = "." not in rel.rpartition("/")[2]
        else:
            routed = not any(fnmatch.fnmatchcase(path, pattern) for pattern in found.exclude)
        if routed:
            return 200, found.navigation
    if found.not_found:
        return 404, found.not_found
    return None


def page_hit(root: str, page: str, packed: VersionFiles | None) -> FileHit | None:
    found = resolve(root, page, slash=False, packed=packed)
    return found if isinstance(found, FileHit) else None


def _page(root: str, web: str, packed: VersionFiles | None, rewrite: Any) -> str:
    """The path in the version of a page a config names (as a visitor's path), if it has one."""
    if not isinstance(rewrite, str) or not rewrite.startswith("/"):
        return ""
    try:
        inner = inside_web(web, site_relpath(rewrite))
    except InvalidInput:
        return ""
    return inner if inner and page_hit(root, inner, packed) is not None else ""


def _config(root: str, web: str, packed: VersionFiles | None) -> dict[str, Any]:
    hit = page_hit(root, inside_web(web, SWA_CONFIG), packed)
    if hit is None or hit.size > _CONFIG_MAX:
        return {}
    try:
        parsed = json.loads(read_small(hit))
    except (OSError, ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the stack
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _expand(pattern: str) -> list[str]:
    """A Static Web Apps glob as fnmatch patterns: ``/images/*.{png,jpg}`` is two."""
    found = _BRACES.search(pattern)
    if found is None:
        return [pattern]
    head, tail = pattern[: found.start()], pattern[found.end() :]
    out: list[str] = []
    for choice in found.group(1).split(",")[:_EXCLUDES_MAX]:
        out += _expand(head + choice + tail)
        if len(out) >= _EXCLUDES_MAX:
            break
    return out[:_EXCLUDES_MAX]
