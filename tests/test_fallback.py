"""A static site's fallback pages as its files declare them, hostile declarations included."""

from __future__ import annotations

import json
from pathlib import Path

from roles.worker._fallback import NO_FALLBACKS, SWA_CONFIG, fallback_for, fallbacks


def _site(tmp_path: Path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return str(tmp_path)


def test_a_config_routes_what_it_does_not_exclude_and_names_its_404_page(tmp_path: Path) -> None:
    config = {
        "navigationFallback": {"rewrite": "/app.html", "exclude": ["/img/*.{png,jpg}", "/api/*"]},
        "responseOverrides": {"404": {"rewrite": "/errors/missing.html"}},
    }
    root = _site(
        tmp_path,
        {"app.html": "a", "errors/missing.html": "m", SWA_CONFIG: json.dumps(config), "404.html": "x"},
    )
    found = fallbacks(root, "", None)
    assert fallback_for(found, "/users/7", "users/7") == (200, "app.html")
    assert fallback_for(found, "/main.js", "main.js") == (200, "app.html")  # not excluded
    assert fallback_for(found, "/img/a.png", "img/a.png") == (404, "errors/missing.html")
    assert fallback_for(found, "/api/x", "api/x") == (404, "errors/missing.html")


def test_the_conventions_without_a_config_and_pages_that_are_not_there(tmp_path: Path) -> None:
    root = _site(tmp_path, {"200.html": "shell", "404.html": "lost"})
    found = fallbacks(root, "", None)
    assert fallback_for(found, "/inbox/3", "inbox/3") == (200, "200.html")
    assert fallback_for(found, "/x.css", "x.css") == (404, "404.html")
    # A config that names pages the version does not have, or outside it, changes nothing.
    bad = {
        "navigationFallback": {"rewrite": "/../../etc/passwd"},
        "responseOverrides": {"404": {"rewrite": "x"}},
    }
    other = _site(tmp_path / "other", {SWA_CONFIG: json.dumps(bad)})
    assert fallbacks(other, "", None) is NO_FALLBACKS


def test_a_hostile_config_is_ignored_or_cut(tmp_path: Path) -> None:
    nested = _site(tmp_path / "nested", {SWA_CONFIG: "[" * 60000, "404.html": "lost"})
    assert fallback_for(fallbacks(nested, "", None), "/a", "a") == (404, "404.html")
    huge = _site(tmp_path / "huge", {SWA_CONFIG: "{" + " " * 70_000 + "}", "index.html": "i"})
    assert fallbacks(huge, "", None) is NO_FALLBACKS
    globs = ["/" + "{" + ",".join(f"p{i}" for i in range(40)) + "}" * 1 + "/*" for _ in range(200)]
    config = {"navigationFallback": {"rewrite": "/index.html", "exclude": globs}}
    many = _site(tmp_path / "many", {SWA_CONFIG: json.dumps(config), "index.html": "i"})
    found = fallbacks(many, "", None)
    # What each miss is matched against is bounded, whatever the config lists.
    assert found.exclude is not None and len(found.exclude) == 64
    assert fallback_for(found, "/p3/x", "p3/x") is None
    assert fallback_for(found, "/route/1", "route/1") == (200, "index.html")
