"""The block of ``/etc/hosts`` the netns fabric manages, so the controller resolves hosts by name.

Only the lines between the two marker comments are ours; everything else in the file is kept as it is.
The file is rewritten whole and renamed into place, so a resolver never reads half of it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from shared.files import atomic_write_bytes
from shared.names import validate_hostname

__all__ = ["BEGIN", "END", "read_block", "render", "update_hosts_file"]

BEGIN = "# BEGIN sitecloud netns hosts (managed by sitecloud; do not edit)"
END = "# END sitecloud netns hosts"


def _split(text: str) -> tuple[list[str], dict[str, str], list[str]]:
    """(lines before the block, the block's name -> address, lines after it)."""
    lines = text.splitlines()
    if BEGIN not in lines:
        return lines, {}, []
    start = lines.index(BEGIN)
    end = lines.index(END, start) if END in lines[start:] else len(lines) - 1
    entries: dict[str, str] = {}
    for line in lines[start + 1 : end]:
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#"):
            entries[fields[1]] = fields[0]
    return lines[:start], entries, lines[end + 1 :]


def read_block(text: str) -> dict[str, str]:
    """The managed entries in a hosts file's text: host name -> address."""
    return _split(text)[1]


def render(text: str, entries: dict[str, str]) -> str:
    """``text`` with the managed block holding exactly ``entries`` (no block when there are none)."""
    before, _, after = _split(text)
    block: list[str] = []
    if entries:
        block = [BEGIN]
        for name, address in sorted(entries.items(), key=lambda kv: ipaddress.ip_address(kv[1])):
            block.append(f"{ipaddress.ip_address(address)}\t{validate_hostname(name)}")
        block.append(END)
    return "".join(f"{line}\n" for line in [*before, *block, *after])


def update_hosts_file(
    path: Path, *, add: dict[str, str] | None = None, remove: set[str] | None = None
) -> None:
    """Add or replace entries and drop others in the managed block of ``path`` (callers hold a lock)."""
    text = path.read_text() if path.exists() else ""
    entries = read_block(text)
    for name in remove or set():
        entries.pop(name, None)
    entries.update(add or {})
    new = render(text, entries)
    if new == text:
        return
    try:
        atomic_write_bytes(path, new.encode(), mode=0o644)
    except OSError:
        # A bind-mounted /etc/hosts (containers) cannot be renamed over: write it in place instead.
        path.write_text(new)
