"""A tenant that churns through many app sites against a worker's active-app cap, end to end through
`sitecloud up`: it stops its own apps, never another tenant's warm one, and past its budget of starts
its own cold visits get 503 with a Retry-After and a line in its site's log, while the other tenant's
starts go on (roles/worker/apps/_tenancy.py).

One cloud for the module, with a cap of 3 running apps and a budget of 4 starts a minute per
subscription: small numbers, so the churn takes seconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roles.worker.apps._tenancy import Slot, Spool, StartBudget, pick_victims, spool_victims
from tests.cloud import LocalCloud, running_cloud

pytestmark = pytest.mark.timeout(180)

CAP = 3
STARTS = 4
ATTACKER_SITES = 5
# Each process of it answers with a token of its own: a new token is a new start.
APP = b"""
import os

TOKEN = os.urandom(8).hex().encode()

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [TOKEN]
"""


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    settings = {
        "worker": {
            "max_active_apps": CAP,
            "subscription_app_starts": STARTS,
            "subscription_app_start_window": 60,
        }
    }
    yield from running_cloud(tmp_path_factory, settings=settings)


@pytest.fixture(scope="module")
def tenants(cloud: LocalCloud, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    app = tmp_path_factory.mktemp("app")
    (app / "app.py").write_bytes(APP)
    cloud.cli("plan", "create", "many", "--max-sites", str(ATTACKER_SITES), "--storage-mb", "5")
    out: dict[str, Any] = {}
    for tenant, sites in (("victim", ["victim", "victim-2"]), ("attacker", _attacker_sites())):
        token = cloud.cli("tenant", "create", tenant)["token"]
        sub = cloud.cli("subscription", "create", "--tenant", tenant, "--plan", "many")["id"]
        for name in sites:
            cloud.cli("site", "create", name, "--subscription", str(sub), token=token)
            cloud.cli("deploy", name, str(app), token=token)
        out[tenant] = {"token": token, "subscription": sub}
    return out


def _attacker_sites() -> list[str]:
    return [f"attacker-{i}" for i in range(ATTACKER_SITES)]


def _log(cloud: LocalCloud, site: str, token: str) -> str:
    got = cloud.cli("site", "logs", site, "--lines", "200", token=token)
    return "\n".join(str(line) for line in got.get("lines", []))


def test_a_tenants_churn_stops_its_own_apps_and_is_held_to_its_budget_of_starts(
    cloud: LocalCloud, tenants: dict[str, Any], tmp_path: Path
) -> None:
    # The victim's second site first, then its first: the one it uses more recently.
    status, _, _ = cloud.get("victim-2")
    assert status == 200
    status, _, warm = cloud.get("victim")
    assert status == 200

    answers: list[tuple[str, int, dict[str, str]]] = []
    for _ in range(3):
        for name in _attacker_sites():
            status, headers, _ = cloud.get(name)
            answers.append((name, status, headers))

    # The victim's warm app was never the price of the churn: the same process answers.
    status, _, body = cloud.get("victim")
    assert (status, body) == (200, warm), "the attacker's churn stopped the victim's warm app"
    # The attacker is held to its starts: past them, 503 with a Retry-After and its log says why.
    refused = [(name, headers) for name, status, headers in answers if status == 503]
    assert refused, f"the attacker started an app at every visit: {[s for _, s, _ in answers]}"
    assert all(status in (200, 503) for _, status, _ in answers), answers
    name, headers = refused[0]
    assert 1 <= int(headers["retry-after"]) <= 60, headers
    assert "not started: its subscription used up" in _log(cloud, name, tenants["attacker"]["token"])
    # The victim's own cold starts go on (its budget is its own).
    status, _, _ = cloud.get("victim-2")
    assert status == 200


def test_a_budget_of_starts_refills_evenly_over_its_window() -> None:
    budget = StartBudget(2, 10.0)
    assert (budget.take("a", 0.0), budget.take("a", 0.0)) == (0.0, 0.0)
    assert budget.take("a", 1.0) == pytest.approx(4.0)  # one start back every 5 s
    assert budget.take("b", 1.0) == 0.0  # another subscription's bucket is its own
    assert budget.take("a", 5.0) == 0.0
    budget.forget(100.0)
    assert (budget.take("a", 100.0), budget.take("a", 100.0)) == (0.0, 0.0)
    unlimited = StartBudget(0, 10.0)
    assert not unlimited.limited and all(unlimited.take("a", 0.0) == 0.0 for _ in range(100))


def test_at_the_cap_the_slot_comes_from_the_subscription_that_holds_the_most() -> None:
    slots = [Slot("a1", "A", 1.0, False), Slot("a2", "A", 2.0, False), Slot("b1", "B", 0.5, False)]
    holding = Counter({"A": 2, "B": 1})
    # B's start takes A's least recently used; A's start takes its own, never B's older one.
    assert pick_victims(slots, holding, 1, for_owner="B") == ["a1"]
    assert pick_victims(slots, holding, 1, for_owner="A") == ["a1"]
    # A holding nothing idle: its start finds no room rather than B's slot.
    assert pick_victims([slots[2]], holding, 1, for_owner="A") == []
    # Equal shares: the least recently used of either.
    assert pick_victims(slots, Counter({"A": 1, "B": 1}), 1, for_owner="C") == ["b1"]
    # A trim: from the biggest holder first, always-on last.
    on = [Slot("a1", "A", 1.0, True), Slot("a2", "A", 2.0, False), Slot("b1", "B", 0.5, False)]
    assert pick_victims(on, Counter({"A": 3, "B": 1}), 2) == ["a2", "b1"]


def test_the_spool_gives_room_from_a_subscription_over_its_share_only() -> None:
    hog = [Spool(f"h{i}", "hog", 4, droppable=True) for i in range(4)]
    # Room left: anybody's body goes in, nothing is dropped.
    assert spool_victims(hog[:3], "other", 4, 16) == []
    # Full of the hog's: another tenant's body takes the room of the hog's biggest, one at a time...
    assert spool_victims([*hog[:3], Spool("big", "hog", 4 + 1, True)], "other", 5, 17) == ["big"]
    assert spool_victims(hog, "other", 6, 16) == ["h0", "h1"]
    # ...but the hog takes nothing from itself, and a finished body (on its way to the app) stays.
    assert spool_victims(hog, "hog", 1, 16) is None
    assert spool_victims([Spool(s.key, s.owner, s.size, False) for s in hog], "other", 1, 16) is None
    # Nobody within its share gives way: two tenants at half each keep what they hold, until a third
    # comes (a third each then).
    halves = [*hog[:2], Spool("o1", "other", 4, True), Spool("o2", "other", 4, True)]
    assert spool_victims(halves, "other", 1, 16) is None
    assert len(spool_victims(halves, "third", 1, 16) or []) == 1
