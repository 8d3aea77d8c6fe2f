"""Tell the controller that desired state changed, so it reconciles now rather than on its next tick."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from shared.errors import SitecloudError
from shared.internal import InternalClient
from shared.logs import ContextLogger

__all__ = ["Nudger"]


class Nudger:
    """Best effort and coalescing: a burst of changes sends one or two nudges; a failure is only logged.

    Requests never fail because of the controller: the DB is the source of truth, a nudge only saves
    time. Site changes may wait a bounded moment for the change to be live (:meth:`settle`).
    """

    def __init__(self, client: InternalClient, controller_url: str, log: ContextLogger) -> None:
        self._client = client
        self._url = f"{controller_url.rstrip('/')}/v1/reconcile" if controller_url else ""
        self._log = log
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        if self._url and self._task is None:
            self._task = asyncio.create_task(self._run(), name="controller-nudge")

    def nudge(self) -> None:
        self._wanted.set()

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await asyncio.wait_for(self._client.post_json(self._url, {}), timeout=5)
            except (SitecloudError, TimeoutError) as exc:
                # Once per outage, not once per change.
                level = logging.DEBUG if self._failing else logging.WARNING
                self._log.log(level, "could not nudge the controller at %s: %s", self._url, exc)
                self._failing = True
            except Exception:  # the nudge loop must outlive any surprise
                self._log.exception("could not nudge the controller at %s", self._url)
            else:
                if self._failing:
                    self._log.info("the controller at %s takes nudges again", self._url)
                self._failing = False

    async def settle(self, generation: int, timeout: float = 5.0) -> bool | None:
        """Ask the controller to apply ``generation`` now and wait until the serving roles run it;
        whether they do (None: there is no controller to ask).

        So a site owner who just created a site can log in by FTP at once. Bounded, and best effort:
        a controller that is down or slow only means the change lands a little later.
        """
        if not self._url:
            return None
        try:
            answer = await asyncio.wait_for(
                self._client.post_json(self._url, {"wait_for": generation, "timeout": timeout}), timeout + 2
            )
        except (SitecloudError, TimeoutError) as exc:
            self._log.debug("could not wait for generation %s: %s", generation, exc)
            return False
        return bool(answer.get("applied")) if isinstance(answer, dict) else False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
