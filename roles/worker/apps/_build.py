"""A build step's output (pip, npm) into the site's log line by line as it comes, so whoever follows
the log (``sitecloud site logs --follow``) sees the install go on, not one block once it is over.
A step that fails is told by its last error lines (:func:`failure_lines`): that is what the deploy
which caused the build reports."""

from __future__ import annotations

import asyncio
import collections
import re
from dataclasses import dataclass

from roles.worker.apps._sitelog import SiteLog

__all__ = ["MAX_LOGGED_LINES", "StepResult", "failure_lines", "run_logged"]

# Lines of one step written to the log; the rest are counted (a chatty build cannot flood the log).
MAX_LOGGED_LINES = 500
_MAX_LINE = 2000
# Lines of a step kept to say why it failed: pip and npm print the reason last.
_TAIL = 30
# How pip ("ERROR: ...") and npm ("npm ERR! ...", "npm error ...") mark the lines that say why.
_ERROR = re.compile(r"^(ERROR:|npm ERR!|npm error)", re.IGNORECASE)
_MAX_REASON_LINES = 5


@dataclass(frozen=True)
class StepResult:
    status: int | None  # the exit status; None when the step ran past its time and was killed
    tail: tuple[str, ...]  # its last lines of output


def failure_lines(tail: tuple[str, ...]) -> list[str]:
    """The lines of a failed step's output that say why: its error lines, else its last ones."""
    errors = [line for line in tail if _ERROR.match(line)]
    return (errors or list(tail))[-_MAX_REASON_LINES:]


async def run_logged(proc: asyncio.subprocess.Process, log: SiteLog, *, timeout: float) -> StepResult:
    """Wait for ``proc`` (stdout a pipe, stderr joined to it), each line of its output to ``log`` as
    ``build``; its exit status (None when it ran past ``timeout``: then it is killed) and last lines."""
    stdout = proc.stdout
    assert stdout is not None
    logged = dropped = 0
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL)

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
            tail.append(text[:_MAX_LINE])
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
        return StepResult(None, tuple(tail))
    if dropped:
        log.write("build", f"({dropped} more lines not logged)")
    return StepResult(proc.returncode, tuple(tail))
