"""The version feed's reports of held hits, without processes: the front end's line is the one
pydantic makes of the report, and each hit's access line on the worker is the one its record makes."""

from __future__ import annotations

import asyncio
import random

from roles.frontend._feed import _held_hit, _report_line
from roles.worker._access import AccessRecord
from roles.worker._feed import VersionFeeds, _Feed
from shared.contracts.feed import FeedReport, HeldHit
from shared.logs import get_logger

# What visitors' bytes may hold: quotes, backslashes, control characters, latin-1 beyond ASCII.
_AWKWARD = b'"\\\x00\n\r\t\x7f\xe9\xff A/'


def _bytes(rnd: random.Random, most: int) -> bytes:
    return bytes(rnd.choice(_AWKWARD) for _ in range(rnd.randint(0, most)))


def _hits(rnd: random.Random) -> list[tuple[str, bytes, int, bytes, bytes, bytes, bytes]]:
    """A burst: a few pages and visitors, each hit with an id of its own (as the request path notes it)."""
    return [
        (
            rnd.choice(["alpha", "beta", "é"]),
            rnd.choice([b"/1k.html", b"/" + _bytes(rnd, 6)]),
            rnd.choice([0, 1024]),
            b"X-Request-Id: 5f1c0a9e2b7d-%x\r\n" % i,
            rnd.choice([b"203.0.113.7", _bytes(rnd, 5)]),
            rnd.choice([b"", b"curl/8.5", _bytes(rnd, 4)]),
            rnd.choice([b"", _bytes(rnd, 4)]),
        )
        for i in range(rnd.randint(0, 40))
    ]


def test_a_report_line_is_the_one_pydantic_makes_of_the_report() -> None:
    rnd = random.Random(7)
    for _ in range(300):
        hits = _hits(rnd)
        ping = rnd.choice([None, 0, 12345])
        held = [_held_hit(*hit) for hit in hits]
        want = FeedReport.model_construct(ack=None, ping=ping, hits=held).model_dump_json().encode() + b"\n"
        line = _report_line(ping, hits)
        assert line == want
        assert FeedReport.parse_json(line).hits == held


class _Sink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def access(self, text: str | AccessRecord) -> None:
        self.lines.append(text.line() if isinstance(text, AccessRecord) else text)


def test_each_reported_hit_is_the_access_line_its_record_makes() -> None:
    rnd = random.Random(11)
    hits: list[HeldHit] = [_held_hit(*hit) for hit in _hits(rnd) + _hits(rnd)]
    # Alike but for the sign of their time, and so printed apart.
    hits += [
        ("alpha", "/z", 200, 5, 0.0, "a-1", "c", "", ""),
        ("alpha", "/z", 200, 5, -0.0, "a-2", "c", "", ""),
    ]
    sinks = {"alpha": _Sink(), "beta": _Sink()}  # "é" is not on this worker: its hits are not logged

    async def report() -> None:
        feeds = VersionFeeds(dict, sinks.get, get_logger("worker"))
        feed = _Feed(feeds)
        feed.data_received(FeedReport(hits=hits).model_dump_json().encode() + b"\n")

    asyncio.run(report())
    for site, sink in sinks.items():
        want = [
            AccessRecord(
                b"GET",
                target.encode("latin-1"),
                status,
                sent,
                seconds,
                {
                    b"x-request-id": rid.encode("latin-1"),
                    b"x-forwarded-for": client.encode("latin-1"),
                    b"user-agent": agent.encode("latin-1"),
                    b"referer": referer.encode("latin-1"),
                },
            ).line()
            for name, target, status, sent, seconds, rid, client, agent, referer in hits
            if name == site
        ]
        assert sink.lines == want
    assert sinks["alpha"].lines[-2:][0].endswith(" 0.0ms id=a-1")
    assert sinks["alpha"].lines[-1].endswith(" -0.0ms id=a-2")
