"""What a new version takes back from an app's own copies of its files (roles/worker/apps/_files.py),
on plain folders: the upper layer of the app's overlay, the version it ran and the new one."""

from __future__ import annotations

import os
import time
from pathlib import Path

from roles.worker.apps._files import _take_back_deployed


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_a_version_that_leaves_out_a_published_database_keeps_the_apps_live_one(tmp_path: Path) -> None:
    """Version 3 published an empty db.sqlite3 by mistake, the app migrated it and stored its data;
    version 4 leaves it out, as .gitignore says: the live database stays (a Django site lost its
    data here), while a published page the new version drops is taken back."""
    old = _tree(tmp_path / "v3", {"manage.py": b"x", "db.sqlite3": b"", "page.html": b"old"})
    new = _tree(tmp_path / "v4", {"manage.py": b"x"})
    upper = _tree(tmp_path / "upper", {"db.sqlite3": b"live data", "page.html": b"app's edit"})
    assert _take_back_deployed(upper, old, new) == ["page.html"]
    assert (upper / "db.sqlite3").read_bytes() == b"live data"
    assert not (upper / "page.html").exists()


def test_a_version_that_publishes_a_different_database_still_replaces_the_live_one(tmp_path: Path) -> None:
    old = _tree(tmp_path / "v1", {"db.sqlite3": b""})
    new = _tree(tmp_path / "v2", {"db.sqlite3": b"seeded"})
    upper = _tree(tmp_path / "upper", {"db.sqlite3": b"live data", "instance/app.db": b"flask"})
    assert _take_back_deployed(upper, old, new) == ["db.sqlite3"]
    assert not (upper / "db.sqlite3").exists()
    assert (upper / "instance/app.db").read_bytes() == b"flask"


def test_a_static_version_with_requirements_names_the_entry_to_set(tmp_path: Path) -> None:
    """Flask's tutorial app (a package with create_app(), no app.py) deploys as a static site: the
    deploy says so and names the entry to set."""
    from roles.worker.apps._manager import _python_without_entry

    (tmp_path / "flaskr").mkdir()
    (tmp_path / "flaskr" / "__init__.py").write_text("def create_app(test_config=None):\n    ...\n")
    assert _python_without_entry(str(tmp_path)) is None
    (tmp_path / "requirements.txt").write_text("flask\n")
    assert _python_without_entry(str(tmp_path)) == "flaskr:create_app()"


def _chain(root: Path, depth: int) -> None:
    """Folders ``a/a/a/…`` ``depth`` deep under ``root``, with a file at the bottom, made one level
    at a time by descriptor (as an app in its folder can: no path is ever that long)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("a", dir_fd=fd)
        below = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)


def test_folders_the_app_made_below_anything_published_cost_the_walk_nothing(tmp_path: Path) -> None:
    """The walk ran a realpath of every folder of the app's (each an lstat per folder above it),
    holding the worker's GIL: five chains 900 deep took 7 s of a worker's CPU per new version, and
    one 1,000 deep failed every start of the site (RecursionError). Below a folder neither version
    has, nothing a deploy changed can be. (700 deep: pytest's own cleanup recurses too.)"""
    old = _tree(tmp_path / "v1", {"page.html": b"old", "deep/x/keep.txt": b"k"})
    new = _tree(tmp_path / "v2", {"page.html": b"new", "deep/x/keep.txt": b"k"})
    upper = _tree(tmp_path / "upper", {"page.html": b"app's edit", "deep/x/keep.txt": b"k"})
    (upper / "mine").mkdir()
    for at in (upper / "mine", upper / "deep" / "x"):
        _chain(at, 700)
    started = time.process_time()
    assert _take_back_deployed(upper, old, new) == ["page.html"]
    assert time.process_time() - started < 0.5


def test_a_file_where_a_version_has_a_folder_is_compared_as_missing(tmp_path: Path) -> None:
    old = _tree(tmp_path / "v1", {"x": b"a file"})
    new = _tree(tmp_path / "v2", {"x/page.html": b"now a folder"})
    upper = _tree(tmp_path / "upper", {"x/page.html": b"the app's"})
    assert _take_back_deployed(upper, old, new) == ["x/page.html"]
