"""A site's requirements.txt is a trust boundary: pip runs as root outside the sandbox, so only named
requirements reach it (no options, paths, URLs, direct references or environment variables). One
that cannot be installed fails the build, with the lines that say why."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from roles.worker.apps._build import failure_lines
from roles.worker.apps._packages import NO_INDEX, checked_requirements, install_requirements
from roles.worker.apps._sitelog import SiteLog
from shared.errors import BuildFailed, InvalidInput


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
        # pip would fill these in from the worker's environment and print them in its error.
        ("nonexistent===${PIP_INDEX_URL}", "environment variables"),
        ("flask; python_version == '${HTTPS_PROXY}'", "environment variables"),
        ("flask==$HOME", "environment variables"),
    ],
)
def test_anything_but_a_named_requirement_is_refused_with_its_line(line: str, says: str) -> None:
    with pytest.raises(InvalidInput) as err:
        checked_requirements(f"flask\n{line}\n")
    assert says in str(err.value) and "line 2" in str(err.value)


def test_a_huge_list_is_refused() -> None:
    with pytest.raises(InvalidInput, match="more than"):
        checked_requirements("".join(f"pkg{i}\n" for i in range(501)))


def _install(tmp_path: Path, requirements: str, *, index_url: str = "") -> tuple[bool, str]:
    """Install a version's requirements.txt as the worker does: what it answered, and its site log."""
    root = tmp_path / "v1"
    root.mkdir(exist_ok=True)
    (root / "requirements.txt").write_text(requirements)
    log = SiteLog(tmp_path / "app.log", 1024 * 1024)
    target = tmp_path / "packages-test"
    try:
        ok = asyncio.run(
            install_requirements(
                root=str(root), target=target, index_url=index_url, python=sys.executable, log=log
            )
        )
    finally:
        log.close()
    return ok, (tmp_path / "app.log").read_text()


def test_a_requirement_no_index_has_fails_the_build_with_pips_error(tmp_path: Path) -> None:
    with pytest.raises(BuildFailed) as err:
        _install(tmp_path, "this-package-does-not-exist-xyz==1.0\n")
    lines = err.value.message.splitlines()
    assert lines[0] == "installing requirements.txt failed (pip exit 1):"
    assert lines[-1] == "ERROR: No matching distribution found for this-package-does-not-exist-xyz==1.0"
    assert err.value.hint and "wheel" in err.value.hint
    log = (tmp_path / "app.log").read_text()
    assert "[build] ERROR: No matching distribution" in log and "failed (pip exit 1)" in log
    assert not (tmp_path / "packages-test").exists()


def test_a_refused_requirements_txt_fails_the_build_and_installs_off_do_not(tmp_path: Path) -> None:
    with pytest.raises(BuildFailed) as err:
        _install(tmp_path, "flask\n-r /etc/shadow\n")
    assert "line 2" in err.value.message and "options" in err.value.message and err.value.hint
    # Installs the worker's admin turned off are no failure of the site's: the app starts without.
    ok, log = _install(tmp_path, "flask\n", index_url=NO_INDEX)
    assert ok is False and "installs are off" in log


def test_the_lines_that_say_why_a_build_failed() -> None:
    pip = (
        "Looking in links: /opt/wheels",
        "ERROR: Could not find a version",
        "ERROR: No matching distribution",
    )
    assert failure_lines(pip) == ["ERROR: Could not find a version", "ERROR: No matching distribution"]
    npm = (
        "added 0 packages",
        "npm error code E404",
        "npm error 404 Not Found - GET https://r/x",
        "npm error A log",
    )
    assert failure_lines(npm) == list(npm[1:])
    assert failure_lines(("npm ERR! code ETARGET",)) == ["npm ERR! code ETARGET"]
    # No marked line: the last ones, at most five.
    assert failure_lines(tuple(f"line {n}" for n in range(9))) == [f"line {n}" for n in range(4, 9)]


def test_installed_scripts_run_under_the_apps_python(tmp_path: Path) -> None:
    """pip writes gunicorn's script for the Python that ran pip; a Procfile runs it under the apps'."""
    from roles.worker.apps._packages import _point_scripts_at

    scripts = tmp_path / "bin"
    scripts.mkdir()
    (scripts / "gunicorn").write_bytes(b"#!/opt/worker/venv/bin/python\nimport sys\nmain()\n")
    (scripts / "tool.sh").write_bytes(b"#!/bin/sh\necho python\n")
    (scripts / "link").symlink_to(scripts / "tool.sh")
    _point_scripts_at(scripts, "/usr/bin/python3.11")
    assert (scripts / "gunicorn").read_bytes() == b"#!/usr/bin/python3.11\nimport sys\nmain()\n"
    assert (scripts / "tool.sh").read_bytes() == b"#!/bin/sh\necho python\n"
