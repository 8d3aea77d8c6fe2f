"""Dynamic sites on the worker: python, php and command runtimes, woken on demand, stopped
when idle, each site under a uid and limits of its own. See docs/architecture.md, "Worker runtimes"."""

from roles.worker.apps._manager import AppManager
from roles.worker.apps._proxy import AppProxy
from roles.worker.apps._routes import app_routes

__all__ = ["AppManager", "AppProxy", "app_routes"]
