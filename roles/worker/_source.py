"""The one rule for what a site's visitors never get as a file, static site or not.

A site's code, its dependency lists and its dot files (``.env``, ``.git/``, ``.htpasswd``) are its
secrets: a static site may become a dynamic one with its next upload, and an upload tool may send
them before anything else, so no site ever serves them raw. So are its databases: a Django project
as ``startproject`` makes it keeps ``db.sqlite3`` (password hashes, sessions) beside its code, and
database dumps left in the web root are the first thing scanners ask for, as are logs and private
keys an app leaves in its own folder. Apps still get such paths
(a PHP script runs, a Python app routes ``/settings.py`` as it likes); only the static file path
refuses them.

It runs once per request that misses the hot cache (a hit was checked when it went in): a few string
operations, no allocation beyond the lower-cased base name.
"""

from __future__ import annotations

__all__ = ["is_app_source", "is_database", "is_never_served"]

# Extensions of code that runs on the server; any "php*" extension counts too (php5, phps, phar...).
_SOURCE_EXTENSIONS = frozenset({"py", "pyc", "pyo", "pyd", "pyw", "pyz", "phtml", "inc", "phar"})
# Editors' and admins' leftovers: "wp-config.php.bak" is the source it was copied from.
_BACKUP_EXTENSIONS = frozenset({"bak", "old", "orig", "save", "swp", "swo", "tmp", "dist", "backup"})
# Dependency manifests, lock files and server config a site carries for its app or its build.
_SOURCE_NAMES = frozenset(
    {
        "procfile", "runtime.txt", "requirements.txt", "pipfile", "pipfile.lock", "pyproject.toml",
        "poetry.lock", "setup.py", "setup.cfg", "composer.json", "composer.lock", "package.json",
        "package-lock.json", "npm-shrinkwrap.json", "yarn.lock", "pnpm-lock.yaml", "gemfile",
        "gemfile.lock", "web.config", "php.ini", "wp-config.php", "dockerfile",
    }
)  # fmt: skip
# Database files and dumps (IIS refuses .mdb, .ldb, .mdf and .ldf the same way), and SQLite's
# journals beside them ("db.sqlite3-journal", "-wal", "-shm").
_DATA_EXTENSIONS = frozenset(
    {"sqlite", "sqlite3", "db", "db3", "s3db", "sl3", "sql", "mdb", "ldb", "mdf", "ldf"}
    # Logs (an app's error log: paths, stack traces, visitors' addresses; WordPress's debug.log is
    # the best known) and private keys (a framework's own, made by its setup: oauth-private.key).
    | {"log", "key", "p12", "pfx", "jks", "keystore"}
)
_DATA_SIDECARS = ("-journal", "-wal", "-shm")
# Of those, the live databases an app keeps in its folder (and their journals).
_DATABASE_EXTENSIONS = frozenset({"sqlite", "sqlite3", "db", "db3", "s3db", "sl3"})
# The one dot folder meant for visitors (RFC 8615): site verification files, security.txt.
_WELL_KNOWN = ".well-known/"


def _source_extension(ext: str) -> bool:
    return ext in _SOURCE_EXTENSIONS or ext.startswith("php")


def is_app_source(rel: str) -> bool:
    """Whether ``rel`` (a path inside a site, through :func:`shared.paths.site_relpath`) is never
    served as a file. Case and trailing dots or spaces do not matter (``APP.PY``, ``app.py.``)."""
    if rel[:1] == "." and not rel.startswith(_WELL_KNOWN):
        return True
    if "/." in rel or "__pycache__" in rel:
        parts = rel.split("/")
        if parts[0] == ".well-known":
            parts = parts[1:]
        if any(p[:1] == "." or p == "__pycache__" for p in parts):
            return True
    # An editor's "app.py~" is the source it was saved from.
    base = rel[rel.rfind("/") + 1 :].lower().rstrip(". ~")
    if base in _SOURCE_NAMES:
        return True
    dot = base.rfind(".")
    if dot < 0:
        return False
    ext = base[dot + 1 :]
    if _source_extension(ext):
        return True
    if ext in _BACKUP_EXTENSIONS:
        before = base[:dot]
        inner = before.rfind(".")
        return before in _SOURCE_NAMES or (inner >= 0 and _source_extension(before[inner + 1 :]))
    # requirements-dev.txt and friends
    return ext == "txt" and base.startswith("requirements")


def is_never_served(rel: str) -> bool:
    """Whether ``rel`` is never served as a file: a site's source (:func:`is_app_source`) or its data."""
    if is_app_source(rel):
        return True
    base = _data_base(rel)
    dot = base.rfind(".")
    if dot < 0:
        return False
    ext = base[dot + 1 :]
    if ext in _DATA_EXTENSIONS:
        return True
    # "db.sqlite3.bak", "dump.sql.old"
    inner = base.rfind(".", 0, dot)
    return ext in _BACKUP_EXTENSIONS and inner >= 0 and base[inner + 1 : dot] in _DATA_EXTENSIONS


def is_database(rel: str) -> bool:
    """Whether ``rel`` names a database file an app keeps beside its code (``db.sqlite3``,
    ``instance/app.db``) or one of SQLite's journals beside it."""
    base = _data_base(rel)
    dot = base.rfind(".")
    return dot >= 0 and base[dot + 1 :] in _DATABASE_EXTENSIONS


def _data_base(rel: str) -> str:
    """The base name of ``rel`` as the data rules read it: lower case, without trailing dots, spaces
    and tildes, and without a SQLite journal's suffix (``db.sqlite3-wal`` is ``db.sqlite3``)."""
    base = rel[rel.rfind("/") + 1 :].lower().rstrip(". ~")
    for sidecar in _DATA_SIDECARS:
        if base.endswith(sidecar):
            return base[: -len(sidecar)]
    return base
