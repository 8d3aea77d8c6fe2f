"""A build step's output (pip, npm) into the site's log line by line as it comes, so whoever follows
the log (``sitecloud site logs --follow``) sees the install go on, not one block once it is over."""

from __future__ import annotations

import asyncio

from roles.worker.apps._sitelog import SiteLog

__all__ = ["MAX_LOGGED_LINES", "run_logged"]

# Lines of one step written to the log; the rest are counted (a chatty build cannot flood the log).
MAX_LOGGED_LINES = 500
_MAX_LINE = 2000


async def run_logged(proc: asyncio.subprocess.Process, log: SiteLog, *, timeout: float) -> int | None:
    """Wait for ``proc`` (stdout a pipe, stderr joined to it), each line of its output to ``log`` as
    ``build``; its exit status, or None when it ran past ``timeout`` (then it is killed)."""
    stdout = proc.stdout
    assert stdout is not None
    logged = dropped = 0

    async def pump() -> None:
        nonlocal logged, dropped
        while True:
            try:
                line = await stdout.readline()
            except ValueError:  # a line past the reader's bound: it was dropped, go on
                line = b"(a line too long to log)\n"
            if not line:
                break
            text = line.decode("utf-8", "replace").rstrip()
            if not text:
                continue
            if logged < MAX_LOGGED_LINES:
                log.write("build", text[:_MAX_LINE])
                logged += 1
            else:
                dropped += 1
        await proc.wait()

    try:
        await asyncio.wait_for(pump(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    if dropped:
        log.write("build", f"({dropped} more lines not logged)")
    return proc.returncode
