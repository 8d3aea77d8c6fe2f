"""``python -m sitecloud_appserver --app MODULE[:ATTR] [--interface auto|wsgi|asgi]``, listening on fd 0.

Every import here is paid by each cold start: the module loads only what the app's interface needs
(no asyncio for WSGI), and the rest (traceback, inspect) only where it is used.
"""

from __future__ import annotations

import os
import socket
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Attributes tried, in order, when the entry names only a module.
_NAMES = ("app", "application")
# Then app factories, as ``flask run`` finds them (Flask's tutorial app has only ``create_app``).
_FACTORIES = ("create_app", "make_app")
# CPython's flag on the code of an ``async def`` (``inspect.CO_COROUTINE``).
_CO_COROUTINE = 0x80


def load(entry: str) -> Any:
    import importlib

    module_name, _, attr = entry.partition(":")
    # gunicorn's and Flask's deployment docs name a factory as "flaskr:create_app()": call it.
    factory = attr.endswith("()")
    attr = attr.removesuffix("()")
    module = importlib.import_module(module_name)
    for name in (attr,) if attr else _NAMES + _FACTORIES:
        app: Any = module
        for part in name.split("."):
            app = getattr(app, part, None)
        if app is not None:
            return app() if factory or (not attr and name in _FACTORIES) else app
    wanted = f"{attr}()" if factory else attr or " or ".join(_NAMES + tuple(f"{n}()" for n in _FACTORIES))
    raise SystemExit(f"module {module_name} has no {wanted} to serve")


def is_asgi(app: Any) -> bool:
    """Whether ``app`` (a function, or an object whose ``__call__`` is one) is ``async``."""
    call = app if hasattr(app, "__code__") or hasattr(app, "__func__") else getattr(app, "__call__", None)  # noqa: B004
    func = getattr(call, "__func__", call)
    code = getattr(func, "__code__", None)
    if code is not None:
        # A marked coroutine function (``inspect.markcoroutinefunction``) is one too.
        return bool(code.co_flags & _CO_COROUTINE) or hasattr(func, "_is_coroutine_marker")
    # Anything less plain (functools.partial, a callable type): inspect's answer.
    import inspect

    return inspect.iscoroutinefunction(call)


# A module still loading after this long most likely runs a server of its own as it is imported.
_SLOW_LOAD_SECONDS = 5


def _still_loading(entry: str) -> None:
    module = entry.partition(":")[0].replace(".", "/")
    print(
        f"{module}.py has not finished loading after {_SLOW_LOAD_SECONDS} s: if it starts a server as it "
        "is imported (app.run() or uvicorn.run() at its top level), that never returns and no request is "
        'answered; put the call under `if __name__ == "__main__":` (the platform serves the module\'s app '
        "itself)",
        file=sys.stderr,
        flush=True,
    )


def _options(argv: list[str]) -> dict[str, str]:
    """``--name value`` pairs; argparse would cost a cold start more than it gives (it imports re)."""
    options = {"--interface": "auto", "--threads": "8"}
    for name, value in zip(argv[::2], argv[1::2], strict=False):
        if name not in ("--app", "--interface", "--threads"):
            raise SystemExit(
                f"usage: sitecloud_appserver --app MODULE[:ATTR] [--interface auto|wsgi|asgi]: {name}?"
            )
        options[name] = value
    if "--app" not in options:
        raise SystemExit("sitecloud_appserver needs --app MODULE[:ATTR]")
    return options


def _where(exc: BaseException, root: str) -> str:
    """' in FILE, line N': the innermost place in the site's own files that the error comes from."""
    import traceback

    place: tuple[str, int | None] | None = None
    if isinstance(exc, SyntaxError) and exc.filename:
        place = (exc.filename, exc.lineno)
    else:
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.filename.startswith(root + os.sep):
                place = (frame.filename, frame.lineno)
    if place is None or not place[0].startswith(root + os.sep):
        return ""
    return f" in {os.path.relpath(place[0], root)}, line {place[1]}"


def main() -> None:
    options = _options(sys.argv[1:])
    entry, interface = options["--app"], options["--interface"]
    sys.path.insert(0, os.getcwd())
    # An alarm rather than a thread: a cold start pays for no threading module. Its handler runs even
    # while the import waits in a system call (a server's accept), which resumes after it.
    import signal

    def warn(signum: int, frame: Any) -> None:
        _still_loading(entry)

    signal.signal(signal.SIGALRM, warn)
    signal.alarm(_SLOW_LOAD_SECONDS)
    try:
        app = load(entry)
    except SystemExit:
        raise
    except BaseException as exc:
        import traceback

        traceback.print_exc(file=sys.stderr)
        # The last line names the error and where in the site's code it is: it is all a deploy and
        # the site's page show of a failed start.
        said = traceback.format_exception_only(exc)[-1].strip()
        raise SystemExit(
            f"the app {entry!r} could not be loaded: {said}{_where(exc, os.getcwd())} "
            "(the site's log has the whole traceback)"
        ) from None
    signal.alarm(0)
    if signal.getsignal(signal.SIGALRM) is warn:  # (an app that set its own keeps it)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    asgi = interface == "asgi" or (interface == "auto" and is_asgi(app))
    print(f"serving {entry} ({'ASGI' if asgi else 'WSGI'}), pid {os.getpid()}", file=sys.stderr, flush=True)
    listener = socket.socket(fileno=0)
    if asgi:
        from ._asgi import serve_asgi

        serve_asgi(app, listener)
    else:
        from ._wsgi import serve_wsgi

        serve_wsgi(app, int(options["--threads"]), listener)


if __name__ == "__main__":
    main()
