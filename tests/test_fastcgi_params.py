"""The CGI variables a PHP request gets, as the FastCGI name-value pairs php-cgi reads (RFC 3875;
FastCGI specification section 3.4), decoded here by the specification rather than by our encoder."""

from __future__ import annotations

from roles.worker.apps._fastcgi import encode_params, pair
from roles.worker.apps._php import fixed_params, request_pairs

SCRIPT = ("/srv/site/index.php", "/index.php", "/blog/post")


def decode(data: bytes) -> list[tuple[bytes, bytes]]:
    """Name-value pairs: each length one byte below 128, else four bytes with the top bit set."""
    out, pos = [], 0

    def length() -> int:
        nonlocal pos
        if data[pos] < 128:
            pos += 1
            return data[pos - 1]
        n = int.from_bytes(data[pos : pos + 4], "big") & 0x7FFFFFFF
        pos += 4
        return n

    while pos < len(data):
        nk = length()
        nv = length()
        out.append((data[pos : pos + nk], data[pos + nk : pos + nk + nv]))
        pos += nk + nv
    return out


def params(
    headers: list[tuple[bytes, bytes]], *, method: bytes = b"GET", body: int = 0
) -> dict[bytes, bytes]:
    pairs = decode(
        request_pairs(
            method=method, target=b"/blog/post?x=1&y=%C3%A9", headers=headers, body_length=body, script=SCRIPT
        )
    )
    names = [k for k, _ in pairs]
    assert len(names) == len(set(names)), "a variable given twice"
    return dict(pairs)


def test_a_request_gets_the_cgi_variables_from_its_line_and_the_front_ends_headers() -> None:
    got = params(
        [
            (b"Host", b"shop.example.com"),
            (b"X-Forwarded-For", b"203.0.113.9, 198.51.100.7"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"shop.example.com:8443"),
            (b"User-Agent", b"curl/8"),
        ]
    )
    assert got[b"REQUEST_METHOD"] == b"GET"
    assert got[b"REQUEST_URI"] == b"/blog/post?x=1&y=%C3%A9"
    assert got[b"QUERY_STRING"] == b"x=1&y=%C3%A9"
    assert (got[b"SCRIPT_FILENAME"], got[b"SCRIPT_NAME"], got[b"PATH_INFO"]) == (
        b"/srv/site/index.php",
        b"/index.php",
        b"/blog/post",
    )
    assert (got[b"SERVER_NAME"], got[b"SERVER_PORT"], got[b"HTTPS"]) == (b"shop.example.com", b"8443", b"on")
    assert got[b"REMOTE_ADDR"] == b"198.51.100.7"  # the address the front end saw, last in the list
    assert got[b"HTTP_USER_AGENT"] == b"curl/8" and got[b"HTTP_X_FORWARDED_PROTO"] == b"https"
    assert got[b"CONTENT_LENGTH"] == b""


def test_plain_http_without_forwarding_headers_gets_the_defaults() -> None:
    got = params([(b"Host", b"site.sites.localhost")])
    assert (got[b"SERVER_NAME"], got[b"SERVER_PORT"]) == (b"site.sites.localhost", b"80")
    assert b"HTTPS" not in got and got[b"REMOTE_ADDR"] == b"127.0.0.1"


def test_a_body_and_its_type_have_variables_of_their_own_and_proxy_is_never_passed() -> None:
    got = params(
        [(b"Content-Type", b"application/json"), (b"Content-Length", b"7"), (b"Proxy", b"http://evil:1")],
        method=b"POST",
        body=7,
    )
    assert got[b"CONTENT_LENGTH"] == b"7" and got[b"CONTENT_TYPE"] == b"application/json"
    assert b"HTTP_CONTENT_TYPE" not in got and b"HTTP_CONTENT_LENGTH" not in got
    assert b"HTTP_PROXY" not in got  # httpoxy
    assert params([], method=b"POST")[b"CONTENT_LENGTH"] == b"0"


def test_a_field_given_twice_is_one_variable_with_both_values() -> None:
    got = params([(b"Accept", b"text/html"), (b"accept", b"*/*"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2")])
    assert got[b"HTTP_ACCEPT"] == b"text/html, */*"
    assert got[b"HTTP_COOKIE"] == b"a=1; b=2"


def test_long_names_and_values_take_four_byte_lengths() -> None:
    value = b"v" * 300
    got = params([(b"X-Long", value)])
    assert got[b"HTTP_X_LONG"] == value
    assert decode(pair(b"N" * 200, b"")) == [(b"N" * 200, b"")]


def test_a_sites_fixed_variables_come_first_and_its_settings_cannot_override_ours() -> None:
    fixed = decode(encode_params(fixed_params("/srv/site", (("APP_MODE", "prod"), ("DOCUMENT_ROOT", "/x")))))
    assert fixed[0] == (b"APP_MODE", b"prod")
    assert dict(fixed)[b"DOCUMENT_ROOT"] == b"/srv/site" and dict(fixed)[b"REDIRECT_STATUS"] == b"200"
