"""A Node site's package.json and package-lock.json are a trust boundary: npm runs as root outside the
sandbox, so only registry packages reach it (no paths, links, git, URLs or workspaces), and how the
app starts is read from package.json as Node hosts do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roles.worker.apps._launch import node_command
from roles.worker.apps._npm import NPMJS, build_command, checked_manifest, node_packages_dir
from roles.worker.apps._spec import detect_runtime, node_entry
from shared.errors import InvalidInput

SAMPLE = Path(__file__).resolve().parent.parent / "docs" / "samples" / "express"
REGISTRIES = (NPMJS, "https://mirror.example/npm/")


def _pkg(**deps: str) -> bytes:
    return json.dumps({"name": "x", "dependencies": deps}).encode()


def _lock(packages: dict[str, dict[str, object]]) -> bytes:
    return json.dumps({"lockfileVersion": 3, "packages": {"": {}, **packages}}).encode()


def test_the_express_sample_and_registry_specs_pass() -> None:
    checked_manifest(
        (SAMPLE / "package.json").read_bytes(), (SAMPLE / "package-lock.json").read_bytes(), REGISTRIES
    )
    checked_manifest(
        _pkg(**{"a": "^1.2.3", "@scope/b": "~2.0.0 || >=3 <4", "c": "latest", "d": "npm:e@1.x", "f": "*"}),
        _lock(
            {
                "node_modules/a": {"version": "1.2.3", "resolved": f"{NPMJS}a/-/a-1.2.3.tgz"},
                "node_modules/@scope/b": {"resolved": "https://mirror.example/npm/@scope/b/-/b-2.0.0.tgz"},
                "node_modules/a/node_modules/c": {"version": "1.0.0"},
            }
        ),
        REGISTRIES,
    )


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("file:../../../etc", "only versions"),
        ("link:/root", "only versions"),
        ("git+ssh://git@github.com/x/y.git", "only versions"),
        ("github:x/y", "only versions"),
        ("x/y", "only versions"),
        ("https://evil.example/pkg.tgz", "only versions"),
        ("npm:e@file:/etc", "only versions"),
        ("${NPM_TOKEN}", "only versions"),
    ],
)
def test_anything_but_a_registry_dependency_is_refused(spec: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        checked_manifest(_pkg(express="^4", bad=spec), None, REGISTRIES)


@pytest.mark.parametrize(
    ("packages", "says"),
    [
        ({"node_modules/a": {"resolved": "https://evil.example/a.tgz"}}, "not from the registry"),
        ({"node_modules/a": {"resolved": "file:/etc/passwd"}}, "not from the registry"),
        ({"node_modules/a": {"resolved": f"{NPMJS}../../x.tgz"}}, "'..'"),
        ({"node_modules/a": {"link": True, "resolved": "../lib"}}, "link"),
        ({"lib": {"version": "1.0.0"}}, "not a package under node_modules"),
        ({"node_modules/../../etc": {}}, "not a package under node_modules"),
    ],
)
def test_a_lock_file_pointing_off_the_registry_is_refused(
    packages: dict[str, dict[str, object]], says: str
) -> None:
    with pytest.raises(InvalidInput, match=says):
        checked_manifest(_pkg(a="1"), _lock(packages), REGISTRIES)


def test_workspaces_overrides_old_locks_and_bad_json_are_refused() -> None:
    cases = [
        (json.dumps({"workspaces": ["a"]}).encode(), None, "workspaces"),
        (json.dumps({"overrides": {"a": "1"}}).encode(), None, "overrides"),
        (json.dumps({"dependencies": ["a"]}).encode(), None, "must be an object"),
        (json.dumps({"dependencies": {"../x": "1"}}).encode(), None, "not an npm package name"),
        (b"{not json", None, "not valid JSON"),
        (_pkg(a="1"), json.dumps({"lockfileVersion": 1, "dependencies": {}}).encode(), "lockfileVersion"),
    ]
    for manifest, lock, says in cases:
        with pytest.raises(InvalidInput, match=says):
            checked_manifest(manifest, lock, REGISTRIES)


def test_how_a_node_app_starts(tmp_path: Path) -> None:
    def site(pkg: dict[str, object], *files: str) -> str:
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        root.mkdir()
        (root / "package.json").write_text(json.dumps(pkg))
        for name in files:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("")
        return str(root)

    assert node_entry(site({"scripts": {"start": "node server.js"}}, "server.js")) == "node server.js"
    assert node_entry(site({"scripts": {"start": "next start -p $PORT"}})) == "npm start"
    assert node_entry(site({"scripts": {"start": "node a.js && node b.js"}})) == "npm start"
    assert node_entry(site({"main": "lib/main.js"}, "lib/main.js", "index.js")) == "node lib/main.js"
    assert node_entry(site({"main": "missing.js"}, "index.js")) == "node index.js"
    assert node_entry(site({"main": "../../etc/passwd"})) is None
    # Only build tools (a PHP or static site with a package.json): not a Node app.
    assert node_entry(site({"scripts": {"build": "vite build"}, "devDependencies": {"vite": "5"}})) is None
    assert detect_runtime(site({"scripts": {"build": "vite build"}}, "index.html")) == ("static", "")
    assert detect_runtime(site({}, "server.js")) == ("node", "node server.js")
    assert detect_runtime(site({}, "server.js", "index.php")) == ("php", "index.php")
    assert detect_runtime(site({}, "server.js", "app.py")) == ("python", "app")


def test_a_main_py_that_binds_an_app_is_a_python_app_and_one_that_does_not_is_not(tmp_path: Path) -> None:
    fastapi = tmp_path / "fastapi"
    fastapi.mkdir()
    (fastapi / "main.py").write_text("from fastapi import FastAPI\n\napp = FastAPI()\n")
    (fastapi / "requirements.txt").write_text("fastapi\n")
    assert detect_runtime(str(fastapi)) == ("python", "main")
    typed = tmp_path / "typed"
    typed.mkdir()
    (typed / "application.py").write_text("application: Flask = Flask(__name__)\n")
    assert detect_runtime(str(typed)) == ("python", "application")
    script = tmp_path / "script"
    script.mkdir()
    (script / "main.py").write_text("print('builds the site')\nmy_app = 1\n")
    (script / "index.html").write_text("<h1>static</h1>")
    assert detect_runtime(str(script)) == ("static", "")
    assert node_command("server.js") == "node server.js"
    assert node_command("npm start") == "npm start"


def test_the_package_directory_follows_package_json_and_its_lock(tmp_path: Path) -> None:
    root = tmp_path / "v1"
    root.mkdir()
    (root / "package.json").write_bytes(_pkg(express="^4"))
    first = node_packages_dir(tmp_path, str(root))
    assert first is not None and first.parent == tmp_path
    (root / "package-lock.json").write_bytes(_lock({}))
    assert node_packages_dir(tmp_path, str(root)) not in (None, first)
    (root / "package.json").write_text(json.dumps({"devDependencies": {"jest": "29"}}))
    assert node_packages_dir(tmp_path, str(root)) is None  # nothing the app needs at run time


def test_an_app_with_a_build_script_is_built_with_its_dev_dependencies(tmp_path: Path) -> None:
    root = tmp_path / "v1"
    root.mkdir()
    (root / "package.json").write_text(json.dumps({"scripts": {"start": "node dist/server.js"}}))
    assert build_command(str(root)) is None
    # A TypeScript app: its compiler is a devDependency, and the build needs it.
    pkg = {
        "scripts": {"build": "tsc", "start": "node dist/server.js"},
        "devDependencies": {"typescript": "^5.6.3"},
    }
    (root / "package.json").write_text(json.dumps(pkg))
    assert build_command(str(root)) == "npm --no-update-notifier --no-fund --no-audit run build"
    with_dev = node_packages_dir(tmp_path, str(root))
    assert with_dev is not None
    # The same package.json without its build script is a package set of its own (no dev tools).
    (root / "package.json").write_text(json.dumps({**pkg, "scripts": {"start": "node dist/server.js"}}))
    assert node_packages_dir(tmp_path, str(root)) is None
    (root / "package.json").write_text(json.dumps({**pkg, "scripts": {"build": "  "}}))
    assert build_command(str(root)) is None


def test_a_command_that_sets_a_variable_or_uses_a_builtin_runs_under_the_shell_not_exec() -> None:
    """``exec VAR=x cmd`` takes the assignment for the program (exit 127): a Procfile line, a release
    command or ``sitecloud site run`` with ``NODE_ENV=production node app.js`` or ``cd src && ...``
    runs as the shell would run it."""
    import subprocess

    from roles.worker.apps._launch import _simple

    assert _simple("gunicorn app:app --workers 2")
    for command in ("NODE_ENV=production node server.js", "cd src", "export A=1", "if true; then :; fi"):
        assert not _simple(command)
    for command in ("GREETING=hi sh -c 'echo $GREETING'",):
        argv = ["/bin/sh", "-c", f"exec {command}" if _simple(command) else command]
        assert subprocess.run(argv, capture_output=True, text=True, check=True).stdout == "hi\n"
