"""Our per-site Python app server lives in ``sitecloud_appserver/``, a package that needs nothing but the
standard library, so that the worker can put that one directory on an app's ``PYTHONPATH`` and run it
with whatever Python the site uses (``python -m sitecloud_appserver``)."""

from pathlib import Path

__all__ = ["APPSERVER_PATH"]

# The directory to put on PYTHONPATH.
APPSERVER_PATH = str(Path(__file__).resolve().parent)
