"""A small WSGI/ASGI server for one site, started by the worker on demand.

The worker binds a unix socket and hands it over as file descriptor 0 (socket activation), so the
process needs no path and no readiness signal: connections wait in the backlog until it accepts.
Each connection carries one request framed by the worker (``Content-Length``), or, when the worker
asks for ``Connection: keep-alive``, one after another, each answer framed (its length, or chunked).
Standard library only: it runs under the site's own Python, outside the worker's environment.
"""

__all__ = ["MEMORY_EXIT"]

# The exit status when the app ran out of memory (its RLIMIT_AS): the worker logs it as a limit stop.
MEMORY_EXIT = 86
