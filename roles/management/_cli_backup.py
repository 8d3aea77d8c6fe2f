"""``sitecloud backup create|restore``: a cloud's tenant data and site content in a directory.

The CLI drives the management API: ``GET /api/v1/backup`` gives the DB's tenant data with each site's
content version at that moment, and each of those versions is downloaded as a zip; a manifest with
every file's sha256 is written last, so a directory without one is an unfinished backup. A restore
checks every checksum, puts the data back (``POST /api/v1/backup/restore``) and deploys each site's zip.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from roles.management._cli_client import ApiClient
from roles.management._cli_output import out
from roles.management._cli_ux import ask
from shared.errors import AlreadyExists, InvalidInput, NotFound, SitecloudError, Unavailable
from shared.words import counted

__all__ = ["add_backup_commands"]

MANIFEST = "manifest.json"
_DB = "db.json"
_CHUNK = 1024 * 1024
# Restored sites reach the publisher and the fileserver with the next snapshot: wait for that.
_DEPLOY_WAIT = 30.0
Leaf = Callable[..., argparse.ArgumentParser]


# What a backup holds of a site is what was published to it; what its app wrote since lives on its
# workers, and is said to be left out every time, so no one learns it from a restore.
NOT_BACKED_UP = (
    "files the sites' apps wrote while they ran (a SQLite database, uploads, sessions in the app's "
    "own folder on its workers): copy them out from the app itself, e.g. `sitecloud site run NAME "
    "'python manage.py dumpdata'` or an export page of the app"
)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _private(path: Path) -> IO[bytes]:
    """A new file of the backup, for its owner alone: it holds password and token hashes, custom
    hostnames' private keys and every site's content."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _entry(root: Path, rel: str) -> dict[str, Any]:
    path = root / rel
    return {"file": rel, "sha256": _sha256(path), "bytes": path.stat().st_size}


def _backup_create(a: argparse.Namespace, api: ApiClient) -> Any:
    root = Path(a.to)
    if root.exists() and not root.is_dir():
        raise InvalidInput(f"{root} is a file, not a directory", hint="back up into a new directory")
    if root.exists() and any(root.iterdir()):
        raise InvalidInput(f"{root} is not an empty directory", hint="back up into a new directory")
    dump = api.request("GET", api.path("backup"))
    versions: dict[str, int] = dump.pop("site_versions")
    if a.site is not None:
        if a.site not in versions:
            raise NotFound(f"there is no site {a.site}")
        versions = {a.site: versions[a.site]}
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(mode=0o700, exist_ok=True)  # one the admin made keeps its mode: the files are 0600
        (root / "sites").mkdir(mode=0o700)
        with _private(root / _DB) as f:
            f.write(json.dumps(dump, ensure_ascii=False).encode())
        sites: dict[str, Any] = {}
        for name, version in sorted(versions.items()):
            if version == 0:
                sites[name] = {"version": 0}  # nothing published yet
                continue
            rel = f"sites/{name}.zip"
            with _private(root / rel) as f:
                api.download(api.path("sites", name, "versions", str(version), "zip"), f)
            sites[name] = {"version": version, **_entry(root, rel)}
    except OSError as exc:
        raise InvalidInput(f"cannot write the backup in {root}: {exc}") from None
    manifest = {
        "format": dump["format"],
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "alembic_revision": dump["alembic_revision"],
        "dialect": dump["dialect"],
        "db": _entry(root, _DB),
        "sites": sites,
        "site_versions": {n: s["version"] for n, s in sites.items()},
    }
    # Last: its presence says the backup is whole.
    try:
        with _private(root / MANIFEST) as f:
            f.write(json.dumps(manifest, indent=2).encode())
    except OSError as exc:
        raise InvalidInput(f"cannot write the backup in {root}: {exc}") from None
    rows = {t: len(r) for t, r in dump["tables"].items()}
    return {
        "directory": str(root),
        "rows": rows,
        "sites": manifest["site_versions"],
        "not_included": NOT_BACKED_UP,
    }


def _checked_file(root: Path, entry: dict[str, Any]) -> Path:
    rel = str(entry.get("file", ""))
    path = (root / rel).resolve()
    if not rel or not path.is_relative_to(root.resolve()) or not path.is_file():
        raise InvalidInput(f"the backup in {root} lacks {rel or 'a file its manifest names'}")
    if _sha256(path) != entry.get("sha256"):
        raise InvalidInput(
            f"{path} does not match its checksum in the manifest: the backup is damaged",
            hint="restore from another backup",
        )
    return path


def _deploy(api: ApiClient, name: str, zip_path: Path) -> Any:
    deadline = time.monotonic() + _DEPLOY_WAIT
    while True:
        try:
            return api.upload(api.path("sites", name, "deploy"), zip_path, progress=io.StringIO())
        except (Unavailable, NotFound):
            # The restored site is not in the publisher's or the fileserver's snapshot yet.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _backup_restore(a: argparse.Namespace, api: ApiClient) -> Any:
    given = [d for d in (a.directory, a.from_dir) if d]
    if len(given) != 1:
        raise InvalidInput(
            "name the backup's directory once" if given else "name the backup's directory",
            hint="sitecloud backup restore DIR (or --from DIR)",
        )
    root = Path(given[0])
    if not root.is_dir():
        raise InvalidInput(
            f"there is no directory {root}" if not root.exists() else f"{root} is not a directory",
            hint="give the directory `sitecloud backup create --to DIR` wrote",
        )
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise InvalidInput(
            f"{root} holds no {MANIFEST}: not a backup, or one that did not finish",
        ) from None
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {root / MANIFEST}: {exc}") from None
    if (
        not isinstance(manifest, dict)
        or not isinstance(manifest.get("db"), dict)
        or not isinstance(manifest.get("sites"), dict)
        or not all(isinstance(e, dict) for e in manifest["sites"].values())
    ):
        raise InvalidInput(f"{root / MANIFEST} is not a sitecloud backup manifest")
    # Every checksum first: a damaged backup changes nothing.
    try:
        dump = json.loads(_checked_file(root, manifest["db"]).read_text())
    except ValueError as exc:
        raise InvalidInput(f"the backup's {_DB} is not JSON: {exc}") from None
    zips = {
        name: _checked_file(root, entry)
        for name, entry in manifest["sites"].items()
        if entry.get("version", 0) > 0
    }
    try:
        answer = api.request("POST", api.path("backup", "restore"), {**dump, "force": False})
    except AlreadyExists:
        if not a.force:
            raise
        # Asked only now: --force on an empty cloud deletes nothing.
        what = "delete every plan, tenant, user and site this cloud has, with their content, for the backup's"
        ask(a, lambda _: (what, "replace"))
        answer = api.request("POST", api.path("backup", "restore"), {**dump, "force": True})
    deployed: dict[str, Any] = {}
    for name, path in sorted(zips.items()):
        try:
            done = _deploy(api, name, path)
        except SitecloudError as err:
            raise type(err)(
                f"site {name}'s content was not restored: {err.message}",
                hint=f"deploy {path} to it with `sitecloud deploy {name} {path}`",
            ) from None
        deployed[name] = {"version": done.get("version"), "files": done.get("files")}
    return {"directory": str(root), "rows": answer["restored"], "sites": deployed}


def _show_created(answer: Any, a: argparse.Namespace) -> None:
    sites = answer["sites"]
    rows = counted(sum(answer["rows"].values()), "row")
    out(f"backed up {counted(len(sites), 'site')} and {rows} into {answer['directory']}")
    for name, version in sites.items():
        out(f"  {name}: version {version}" if version else f"  {name}: nothing published")
    out(f"not included: {answer['not_included']}")


def _show_restored(answer: Any, a: argparse.Namespace) -> None:
    rows = ", ".join(f"{n} {t}" for t, n in answer["rows"].items() if n)
    out(f"restored {rows} from {answer['directory']}")
    for name, done in answer["sites"].items():
        out(f"  {name}: {counted(done['files'], 'file')} deployed as version {done['version']}")


def add_backup_commands(group: Callable[[str, str], Any], leaf: Leaf) -> None:
    backup = group("backup", "back up and restore a cloud's tenants, sites and content (admin)")
    sp = leaf(
        backup,
        "create",
        "write the DB's tenant data and every site's current content into a new directory",
        _backup_create,
        _show_created,
    )
    sp.add_argument("--to", required=True, metavar="DIR", help="a new (or empty) directory")
    sp.add_argument("--site", metavar="NAME", help="only this site's content (the DB's data is whole)")
    sp = leaf(
        backup,
        "restore",
        "bring a backup back into a fresh cloud: plans, tenants, sites, credentials, content",
        _backup_restore,
        _show_restored,
    )
    sp.add_argument("directory", metavar="DIR", nargs="?", help="the backup's directory")
    sp.add_argument("--from", dest="from_dir", metavar="DIR", help="the same, as create's --to names it")
    sp.add_argument(
        "--force", action="store_true", help="replace this cloud's own plans, tenants, users and sites"
    )
    sp.add_argument(
        "-y", "--yes", action="store_true", help="with --force: do not ask (needed with no terminal)"
    )
