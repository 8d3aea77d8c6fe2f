"""`python -m bench.contracts`: what reading the fileserver's big messages costs a worker.

A manifest of a 20,000-file site and a change-feed page of 5,000 changes, parsed from their bytes with
their contract types (`shared/contracts/content.py`), against an anchor in the same run: decoding the
same bytes with `json.loads` and no check at all. Rounds alternate (A B A B ...); the best of each is
shown, since the box is shared and the best round is the least disturbed one.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import time
from collections.abc import Callable

from shared.contracts.content import ChangeFeedPage, FileMeta, Manifest, encode_manifest

FILES = 20_000
CHANGES = 5_000


def _manifest() -> bytes:
    files = [
        (
            f"dir{i % 100}/sub{i % 7}/file-{i}.html",
            FileMeta(sha256=hashlib.sha256(str(i).encode()).hexdigest(), size=i * 10, mtime=1.7e9 + i),
        )
        for i in range(FILES)
    ]
    dirs = {p.rsplit("/", 1)[0] for p, _ in files} | {p.split("/", 1)[0] for p, _ in files}
    return encode_manifest("blog", 12, sum(m.size for _, m in files), files, dirs)


def _feed_page() -> bytes:
    changes = [{"seq": i, "site": f"site{i}", "version": i} for i in range(1, CHANGES + 1)]
    return json.dumps({"seq": CHANGES, "changes": changes, "reset": False}).encode()


def _best(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    best = dict.fromkeys(cases, float("inf"))
    gc.disable()
    try:
        for _ in range(rounds):
            for name, case in cases.items():
                start = time.perf_counter()
                case()
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        gc.enable()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    manifest, page = _manifest(), _feed_page()
    best = _best(
        {
            "manifest: json.loads": lambda: json.loads(manifest),
            "manifest: Manifest.parse_json": lambda: Manifest.parse_json(manifest),
            "feed page: json.loads": lambda: json.loads(page),
            "feed page: ChangeFeedPage.parse_json": lambda: ChangeFeedPage.parse_json(page),
        },
        args.rounds,
    )
    for name, seconds in best.items():
        print(f"{name:40s} {seconds * 1000:8.1f} ms")
    for what in ("manifest", "feed page"):
        anchor, parsed = (v for k, v in best.items() if k.startswith(what + ":"))
        print(f"{what}: parse / json.loads = {parsed / anchor:.2f}")


if __name__ == "__main__":
    main()
