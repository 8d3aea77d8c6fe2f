"""The worker's pool of kept app connections: who gets a connection as it comes back or turns busy."""

from __future__ import annotations

import asyncio
import time

from roles.worker.apps._pool import BEHIND_AGE, BEHIND_DEPTH, UpstreamPool


class Conn:
    """A kept connection as the pool sees it (open until closed)."""

    def __init__(self) -> None:
        self.open = True

    def alive(self) -> bool:
        return self.open

    def close(self) -> None:
        self.open = False


def test_a_busy_connection_goes_to_the_first_waiting_request_before_any_later_one() -> None:
    pool = UpstreamPool(max_open=1)
    assert pool.room() and not pool.room()
    conn = Conn()
    pool.busy(conn)
    got: list[tuple[str, object, bool]] = []
    pool.wait(lambda c, behind: got.append(("first", c, behind)) is None)
    pool.wait(lambda c, behind: got.append(("second", c, behind)) is None)
    # The request behind the busy one went out: its connection is busy again with that one, and
    # the first waiter (not a request arriving later, through behind()) takes the place after it.
    pool.busy(conn)
    assert got == [("first", conn, True)]
    assert pool.behind() is None
    pool.busy(conn)
    assert got[-1] == ("second", conn, True)
    pool.busy(conn)
    assert pool.behind() is conn and pool.behind() is None


def test_a_lease_waits_for_an_idle_connection_not_a_busy_one() -> None:
    async def run() -> tuple[bool, Conn | None]:
        pool = UpstreamPool(max_open=1)
        assert pool.room()
        conn = Conn()
        lease = asyncio.ensure_future(pool.lease())
        await asyncio.sleep(0)
        pool.busy(conn)  # declined: a lease closes what it gets, and this one is answering
        declined = not lease.done()
        pool.unbusy(conn)
        assert pool.put(conn)
        return declined, await lease  # type: ignore[return-value]

    declined, leased = asyncio.run(run())
    assert declined and leased is not None and leased.open


def test_only_behind_a_request_that_went_out_just_now() -> None:
    pool = UpstreamPool(max_open=2)
    old, new = Conn(), Conn()
    pool.busy(old)
    pool.busy(new)
    assert pool.behind() is new  # the newest first
    time.sleep(BEHIND_AGE * 1.5)  # the other went out a while ago: likely a slow one
    assert pool.behind() is None


def test_a_busy_connection_takes_as_many_requests_behind_it_as_it_has_room_for() -> None:
    pool = UpstreamPool(max_open=1)
    assert pool.room()
    conn = Conn()
    got: list[str] = []
    for name in ("first", "second", "third"):
        pool.wait(lambda c, behind, name=name: got.append(name) is None)  # type: ignore[misc]
    # Room for two behind the one it is on: the first two waiters go, in order; the third waits.
    pool.busy(conn, BEHIND_DEPTH)
    assert got == ["first", "second"][:BEHIND_DEPTH] and pool.behind() is None
    # One answered, so one place opens: the third takes it.
    pool.busy(conn, 1)
    assert got[-1] == "third"
    # With no waiters left, a request arriving later may take the places (while its age allows).
    pool.busy(conn, 2)
    assert pool.behind() is conn and pool.behind() is conn and pool.behind() is None


def test_a_closed_busy_connection_is_not_offered() -> None:
    pool = UpstreamPool(max_open=2)
    gone, live = Conn(), Conn()
    pool.busy(live, 2)
    pool.busy(gone, 2)
    gone.close()
    assert pool.behind() is live
