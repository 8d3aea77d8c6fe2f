"""A site's requirements.txt is a trust boundary: pip runs as root outside the sandbox, so only named
requirements reach it (no options, paths, URLs or direct references)."""

from __future__ import annotations

import pytest

from roles.worker.apps._packages import checked_requirements
from shared.errors import InvalidInput


def test_named_requirements_pass_normalised_with_comments_and_continuations() -> None:
    text = (
        "# the app's packages\n"
        "Flask==3.0.3   # web\n"
        "requests >=2.31, <3\n"
        "\n"
        "uvicorn[standard]==0.30.1 ; python_version >= '3.9'\n"
        "gunicorn\\\n"
        "==22.0.0\n"
    )
    assert checked_requirements(text) == [
        "Flask==3.0.3",
        "requests<3,>=2.31",
        'uvicorn[standard]==0.30.1; python_version >= "3.9"',
        "gunicorn==22.0.0",
    ]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("-e ./mypkg", "options"),
        ("-r /etc/shadow", "options"),
        ("--index-url https://evil.example/simple", "options"),
        ("-f file:///root", "options"),
        ("--extra-index-url=https://x", "options"),
        ("./localdir", "not a package requirement"),
        ("/abs/path/pkg.tar.gz", "not a package requirement"),
        ("file:///tmp/pkg", "not a package requirement"),
        ("https://example.com/pkg.whl", "not a package requirement"),
        ("pkg @ file:///tmp/pkg", "direct references"),
        ("pkg @ https://example.com/pkg.whl", "direct references"),
        ("flask==3.0.3 --hash=sha256:00", "not a package requirement"),
    ],
)
def test_anything_but_a_named_requirement_is_refused_with_its_line(line: str, says: str) -> None:
    with pytest.raises(InvalidInput) as err:
        checked_requirements(f"flask\n{line}\n")
    assert says in str(err.value) and "line 2" in str(err.value)


def test_a_huge_list_is_refused() -> None:
    with pytest.raises(InvalidInput, match="more than"):
        checked_requirements("".join(f"pkg{i}\n" for i in range(501)))
