"""The front end's request-head rules as pure functions: no sockets, no processes."""

from __future__ import annotations

import pytest

from roles.frontend._head import (
    AUTHORIZATION,
    CONDITIONAL,
    ENCODING,
    IDEMPOTENT,
    NOTED,
    absolute_form,
    https_redirect,
    normalize_host,
    only_chunked,
    valid_host,
)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (b"Example.COM", b"example.com"),
        (b"example.com:8443", b"example.com"),
        (b"example.com.", b"example.com"),
        (b"Example.com.:80", b"example.com"),
        (b"[::1]", b"[::1]"),
        (b"[::1]:8080", b"[::1]"),
        (b"", b""),
    ],
)
def test_normalize_host_keys_like_the_routes(value: bytes, key: bytes) -> None:
    assert normalize_host(value) == key


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (b"blog.example", True),
        (b"Blog.Example.:8443", True),
        (b"blog.example:", True),  # RFC 3986: port = *DIGIT
        (b"[::1]:8080", True),
        (b"10.0.0.1:80", True),
        (b"blog.example:443@evil.example", False),
        (b"blog.example:80/x", False),
        (b"blog.example:x", False),
        (b"blog.example:123456", False),
        (b"me@blog.example", False),
        (b"blog.example/x", False),
        (b"blog example", False),
    ],
)
def test_valid_host_is_a_host_and_a_numeric_port(value: bytes, ok: bool) -> None:
    assert valid_host(value) is ok


def test_absolute_form_takes_host_and_port_and_keeps_the_query() -> None:
    assert absolute_form(b"http://Example.com:8080/a/b?x=1") == (b"Example.com:8080", b"/a/b?x=1")


def test_absolute_form_without_a_path_is_the_root() -> None:
    assert absolute_form(b"http://example.com") == (b"example.com", b"/")


def test_absolute_form_without_a_host_leaves_the_target_alone() -> None:
    assert absolute_form(b"//x/y") is None


@pytest.mark.parametrize("target", [b"foo", b"example.com:443"])
def test_absolute_form_refuses_what_is_not_a_url(target: bytes) -> None:
    with pytest.raises(ValueError, match="is not a URL"):
        absolute_form(target)


@pytest.mark.parametrize(
    ("te", "ok"),
    [
        (b"chunked", True),
        (b" Chunked ", True),
        (b"gzip, chunked", False),
        (b"chunked, chunked", False),
        (b"identity", False),
        (b"", False),
    ],
)
def test_only_chunked_is_reframed(te: bytes, ok: bool) -> None:
    assert only_chunked(te) is ok


def test_https_redirect_keeps_get_as_301_and_drops_the_default_port() -> None:
    page = https_redirect(b"GET", b"site.example", b"/a?b", 443)
    assert page.status == 301
    assert b"\r\nLocation: https://site.example/a?b\r\n" in page.keep
    assert page.keep.endswith(b"Connection: keep-alive\r\n\r\n")
    assert page.close.endswith(b"Connection: close\r\n\r\n")


def test_https_redirect_keeps_a_post_a_post_and_names_another_port() -> None:
    page = https_redirect(b"POST", b"site.example", b"/form", 8443)
    assert page.status == 308
    assert b"\r\nLocation: https://site.example:8443/form\r\n" in page.keep


def test_noted_headers_and_replayable_methods() -> None:
    assert NOTED[b"if-none-match"] == CONDITIONAL
    assert NOTED[b"range"] == CONDITIONAL
    assert NOTED[b"authorization"] == AUTHORIZATION
    assert NOTED[b"accept-encoding"] == ENCODING
    assert b"cookie" not in NOTED
    assert b"GET" in IDEMPOTENT
    assert b"POST" not in IDEMPOTENT
