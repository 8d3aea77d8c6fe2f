"""The lifecycle every role process follows: start, serve, drain on SIGTERM within a bound, exit.

:func:`role_main` is every role's entry point (:func:`preforked_role_main` for one that may serve from
several processes, see :mod:`shared.prefork`); :func:`run_until_stopped` is the part the controller,
started by ``sitecloud up`` rather than from a ``role.json``, shares with them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from shared.config import RoleConfig, ServingConfig, load_role_config
from shared.listeners import inherited, serve_handback
from shared.logs import setup_logging
from shared.loop_errors import handle_loop_error
from shared.prefork import PreforkedRole, strip_processes_flag

__all__ = ["preforked_role_main", "role_main", "run_until_stopped"]

C = TypeVar("C", bound=RoleConfig)
S = TypeVar("S", bound=ServingConfig)


def _raise_open_files_limit() -> None:
    """Every visitor connection is a descriptor: take the hard limit, not the soft one (often 1,024)
    that would cap a front end at a thousand visitors (as nginx's worker_rlimit_nofile does)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft and (hard == resource.RLIM_INFINITY or hard > soft):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_until_stopped(serve: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run ``serve`` on uvloop until it returns; SIGTERM or SIGINT sets its stop event (it then drains
    and returns), and the signal handlers are taken away again after."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(handle_loop_error)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    uvloop.run(run())


def role_main(config_cls: type[C], serve: Callable[[C, asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Entry point of ``python -m roles.<role> --config role.json``.

    ``serve`` runs until the stop event is set (SIGTERM or SIGINT), then drains and returns.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True, help="the role.json the controller wrote")
    args = parser.parse_args()
    config = load_role_config(config_cls, args.config)
    setup_logging(config.role, config.host, config.log_level)
    _raise_open_files_limit()
    # Before anything else starts: the supervisor's listeners, and a way to give them to its successor.
    serve_handback(inherited())
    run_until_stopped(lambda stop: serve(config, stop))


def preforked_role_main(config_cls: type[S], role: PreforkedRole[S]) -> None:
    """Entry point of a role that may serve from several processes: ``--processes N`` as well."""
    strip_processes_flag()
    role_main(config_cls, role.serve)
