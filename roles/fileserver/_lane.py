"""The put lane's server side (:mod:`shared.contracts.putlane`): small files from the publisher, each
stored as the content API's ``PUT /v1/sites/{site}/files/{path}`` stores it and answered with the
same JSON once its journal record is durable.

A connection takes one request at a time, in order; it is read whole before it is stored (the
publisher sends small files only, up to :data:`PUT_LANE_MAX_BODY`). Only the publisher may open one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import cast

from roles.fileserver.store import ContentStore
from shared.contracts.putlane import PUT_HEAD, PUT_LANE_MAX_BODY, PutFrame, encode_answer
from shared.disk import is_disk_full, storage_full
from shared.errors import BadRequest, Forbidden, SitecloudError
from shared.logs import get_logger
from shared.pki import role_of_peer

__all__ = ["PutLanes"]

# A lane idle this long is closed (as aiohttp closes an idle keep-alive connection); the publisher
# opens another when it next needs one.
_IDLE_TIMEOUT = 75.0
# Bytes a lane holds unread behind the request being stored before it stops reading.
_BUFFERED_MAX = 2 * PUT_LANE_MAX_BODY


def _refusal(err: SitecloudError) -> bytes:
    return encode_answer(err.status, json.dumps(err.to_json()).encode())


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


class PutLanes:
    """The open put lanes of one fileserver; :meth:`protocol` makes one for a new connection."""

    def __init__(self, store: ContentStore, *, role: str, host: str) -> None:
        self._store = store
        self._log = get_logger(role, host=host)
        self._open: set[_PutLane] = set()

    def protocol(self) -> asyncio.Protocol:
        return _PutLane(self)

    async def close(self, timeout: float = 5.0) -> None:
        """Close every lane once the put it is storing (if any) is answered, within ``timeout``; the
        answers written go out first."""
        lanes = list(self._open)
        for lane in lanes:
            lane.close_when_done()
        pending = [lane.busy for lane in lanes if lane.busy is not None]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for lane in lanes:
            if lane.busy is not None:
                lane.abort()  # still storing past the bound: its answer is not waited for


class _PutLane(asyncio.Protocol):
    def __init__(self, lanes: PutLanes) -> None:
        self._lanes = lanes
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self.busy: asyncio.Task[None] | None = None
        self._closing = False
        self._paused = False
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's TLS transport is not a subclass of asyncio's, but is one.)
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._lanes._open.add(self)
        role = role_of_peer(transport.get_extra_info("peercert"))
        if role != "publisher":
            # The HTTP API answers such a caller 403; here the refusal is the answer to come.
            err = Forbidden(f"role {role or 'unknown'} may not open a put lane")
            transport.write(_refusal(err))
            self.close_when_done()
            return
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lanes._open.discard(self)
        self._transport = None
        if self._idle is not None:
            self._idle.cancel()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self.busy is None:
            self._next()
        elif len(self._buffer) > _BUFFERED_MAX and self._transport is not None:
            # The publisher waits for each answer; whatever sends on regardless waits for its turn.
            self._transport.pause_reading()
            self._paused = True

    def _next(self) -> None:
        """Start storing the next whole request, if one is in."""
        if self._closing or self._transport is None or len(self._buffer) < PUT_HEAD.size:
            return
        size = PutFrame.size_of(self._buffer)
        if PutFrame.body_size_of(self._buffer) > PUT_LANE_MAX_BODY:
            err = BadRequest(f"a put lane takes files up to {PUT_LANE_MAX_BODY} bytes")
            self._transport.write(_refusal(err))
            self.close_when_done()
            return
        if len(self._buffer) < size:
            return
        frame = bytes(self._buffer[:size])
        del self._buffer[:size]
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.busy = asyncio.get_running_loop().create_task(self._store(frame))
        self.busy.add_done_callback(self._done)

    async def _store(self, raw: bytes) -> None:
        store = self._lanes._store
        try:
            try:
                frame = PutFrame.parse(raw)
            except ValueError:
                raise BadRequest("a put lane frame's names are not UTF-8") from None
            uid = frame.content_id  # as an HTTP put's ``uid``: the publisher always names it
            stored = await store.put_file(frame.site, frame.path, _once(frame.body), len(frame.body), uid)
            answer = encode_answer(200, await store.put_answer(frame.site, stored, frame.since, uid))
        except SitecloudError as err:
            answer = _refusal(err)
        except Exception as exc:
            if is_disk_full(exc):
                self._lanes._log.warning("a put from a put lane refused, the disk is full: %s", exc)
                answer = _refusal(storage_full())
            else:
                self._lanes._log.exception("storing a file from a put lane failed")
                answer = _refusal(SitecloudError("internal error; the request was not completed"))
        if self._transport is not None:
            self._transport.write(answer)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.busy = None
        if self._closing:
            self.abort_when_flushed()
            return
        if self._paused and self._transport is not None:
            self._transport.resume_reading()
            self._paused = False
        self._arm_idle()
        self._next()

    def _arm_idle(self) -> None:
        if self._transport is not None and self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(_IDLE_TIMEOUT, self.close_when_done)

    def close_when_done(self) -> None:
        """Take no further request; close once the one being stored (if any) is answered."""
        self._closing = True
        if self.busy is None:
            self.abort_when_flushed()

    def abort_when_flushed(self) -> None:
        if self._transport is not None:
            self._transport.close()  # what was written is sent first

    def abort(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.abort()
