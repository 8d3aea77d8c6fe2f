"""The one back-off rule every retry loop uses: the delays it gives, pinned for each of its users."""

from __future__ import annotations

import pytest

from roles.controller import hostagent, supervisor
from roles.worker import content
from roles.worker.apps import _manager
from shared.backoff import Backoff


def test_delays_double_from_first_up_to_the_cap() -> None:
    backoff = Backoff(first=0.5, cap=30.0)
    assert [backoff.delay(n) for n in range(9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_each_retry_loop_keeps_its_delays() -> None:
    # Content sync and the change feed: from 0.2 s up to 10 s (the first wait is after one failure).
    assert [content._RETRY.delay(n) for n in range(1, 8)] == [0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    # An app that failed to start or crashed: from 0.25 s up to 30 s.
    assert [_manager._RETRY.delay(n) for n in range(1, 9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    # A role process restarted, on the controller's host and by a host agent alike.
    for restart in (supervisor._RESTART, hostagent._RESTART):
        assert [restart.delay(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_long_run_of_failures_stays_at_the_cap() -> None:
    backoff = Backoff(first=0.2, cap=10.0)
    assert backoff.delay(10_000) == 10.0
    assert backoff.delay(-3) == 0.2


@pytest.mark.parametrize(("first", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_a_back_off_that_could_not_wait_is_refused(first: float, cap: float) -> None:
    with pytest.raises(ValueError, match="0 < first <= cap"):
        Backoff(first=first, cap=cap)
