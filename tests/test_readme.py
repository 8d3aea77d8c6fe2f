"""The README's walk-through, run line by line against a fresh `sitecloud up` cloud.

The blocks marked ``<!-- walk-through ... -->`` are run in order, each command in bash as a reader
would type it: the cloud's home is ``~/.local/share/sitecloud`` of a fresh HOME, ``sitecloud`` is the
venv's, and the README's ports become the test cloud's. A line ``#   text`` after a command is what
that command prints (``…`` stands for anything); it must appear in the command's output, in order.
``<the tenant token>`` and ``<password>`` are what earlier commands printed, as a reader copies them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cloud import LocalCloud

pytestmark = pytest.mark.timeout(240)

README = Path(__file__).resolve().parent.parent / "README.md"
MARK = "<!-- walk-through"
# What the README's commands need on this machine (its prerequisites).
TOOLS = ("lftp", "zip", "curl", "git", "bash", "timeout")
# The README's default ports, and which of the test cloud's ports each one is.
PORTS = {"8443": "https_port", "2121": "ftp_port", "8172": "deploy_port", "8090": "api_port"}
# The places the reader pastes what an earlier command printed, and where to find it.
PASTED = {
    "<the tenant token>": re.compile(r"^token: (\S+)$", re.M),
    "<password>": re.compile(r"^\s*ftp password\s+(\S+)$", re.M),
}
# Variables of this test machine that a reader's fresh shell does not have.
UNSET = (
    "SITECLOUD_HOME",
    "SITECLOUD_TOKEN",
    "GIT_SSL_CAINFO",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
)
# A command that streams until Ctrl-C runs this long, then is stopped as the reader would stop it.
FOLLOW_SECONDS = 6


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


def walk_through(text: str) -> list[Step]:
    """The commands of the marked ``sh`` blocks, in order, each with the output lines shown after it."""
    steps: list[Step] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith(MARK):
            i += 1
            continue
        assert lines[i + 1] == "```sh", f"README line {i + 2}: a marked block must follow its mark"
        i += 2
        while lines[i] != "```":
            line = lines[i]
            i += 1
            if line.startswith("#   ") and steps:
                steps[-1].expected.append(line[4:].strip())
                continue
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            command = [line]
            while command[-1].endswith("\\"):
                command.append(lines[i])
                i += 1
            heredoc = re.search(r"<<'(\w+)'", line)
            if heredoc:
                while lines[i] != heredoc.group(1):
                    command.append(lines[i])
                    i += 1
                command.append(lines[i])
                i += 1
            steps.append(Step("\n".join(command)))
        i += 1
    return steps


def pattern(expected: str) -> re.Pattern[str]:
    """An output line as the README shows it: ``…`` is anything, runs of spaces are any spaces."""
    pieces = re.split(r"(\s+|…)", expected)
    return re.compile(
        "".join(r"\s+" if p.isspace() else ".*" if p == "…" else re.escape(p) for p in pieces if p)
    )


def missing_lines(expected: list[str], output: str) -> list[str]:
    """The expected lines not found in the output in order (each one matches a whole output line)."""
    got = [line.strip() for line in re.split(r"[\r\n]+", output)]
    at, missing = 0, []
    for want in expected:
        regex = pattern(want)
        for j in range(at, len(got)):
            if regex.fullmatch(got[j]):
                at = j + 1
                break
        else:
            missing.append(want)
    return missing


class Shell:
    """bash as the reader's terminal: exported variables and the working directory carry over."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.state = cwd.parent / "shell-state.sh"
        self.where = cwd.parent / "shell-cwd"
        self.where.write_text(str(cwd))
        self.state.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))

    def run(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        script = (
            f'. {shlex.quote(str(self.state))}\ncd "$(cat {shlex.quote(str(self.where))})"\n{command}\n'
            f"rc=$?\nexport -p > {shlex.quote(str(self.state))}\npwd > {shlex.quote(str(self.where))}\n"
            "exit $rc\n"
        )
        return subprocess.run(
            ["bash", "--noprofile", "--norc", "-c", script],
            env={"PATH": os.defpath},
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def reader_home() -> Iterator[Path]:
    # Site apps run as uids of their own and must pass through the cloud home's ancestors.
    root = Path(tempfile.mkdtemp(prefix="sitecloud-readme-"))
    os.chmod(root, 0o711)
    home = root / "reader"
    (home / ".local" / "share").mkdir(parents=True, mode=0o755)
    yield home
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cloud(reader_home: Path) -> Iterator[LocalCloud]:
    cloud = LocalCloud(reader_home / ".local" / "share" / "sitecloud")
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.kill_everything()


def test_the_walk_through_parses_into_commands_with_their_output() -> None:
    steps = walk_through(README.read_text())
    commands = [s.command.split()[0] for s in steps]
    assert commands.count("sitecloud") >= 10 and "lftp" in commands and "git" in commands
    assert sum(len(s.expected) for s in steps) >= 15
    assert missing_lines(["created subscription 1: …"], "x\ncreated subscription 1: tenant a, plan b\n") == []
    assert missing_lines(["a  b"], "a b c\n") == ["a  b"]


def test_the_readme_walk_through_runs_as_written(cloud: LocalCloud, reader_home: Path) -> None:
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        pytest.skip(f"the walk-through needs {', '.join(absent)} (apt-get install -y {' '.join(absent)})")
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(
        HOME=str(reader_home),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', os.defpath)}",
        # A reader's git knows their name; this machine's may not.
        GIT_AUTHOR_NAME="Reader",
        GIT_AUTHOR_EMAIL="reader@example.com",
        GIT_COMMITTER_NAME="Reader",
        GIT_COMMITTER_EMAIL="reader@example.com",
    )
    work = reader_home / "work"
    work.mkdir()
    shell = Shell(work, env)
    pasted: dict[str, str] = {}
    ports = {default: str(cloud.ports[key]) for default, key in PORTS.items()}

    def localise(text: str) -> str:
        return re.sub(r"\b(8443|2121|8172|8090)\b", lambda m: ports[m.group(1)], text)

    done: list[Step] = []
    for step in walk_through(README.read_text()):
        command = localise(step.command)
        for placeholder, value in pasted.items():
            command = command.replace(placeholder, value)
        assert "<the tenant token>" not in command and "<password>" not in command, command
        following = "--follow" in command
        if following:
            command = f"timeout -s INT {FOLLOW_SECONDS} {command}"
        expected = [localise(line) for line in step.expected]
        # A visitor right after a site's first publish waits for it (the worker holds the request),
        # but after a later one may see the version before for a moment, as on any CDN.
        first = command.startswith("curl") and not any(s.command.startswith("curl") for s in done)
        tries = 20 if command.startswith("curl") and "--data-binary" not in command and not first else 1
        for attempt in range(tries):
            proc = shell.run(command)
            missing = missing_lines(expected, proc.stdout + "\n" + proc.stderr)
            if not missing or attempt == tries - 1:
                break
            time.sleep(0.25)
        ok_codes = (0, 124, 130) if following else (0,)
        assert proc.returncode in ok_codes and not missing, (
            f"README command failed:\n{step.command}\nexit {proc.returncode}; expected lines not printed: "
            f"{missing}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n{cloud.role_logs()[-3000:]}"
        )
        done.append(step)
        for placeholder, regex in PASTED.items():
            found = regex.search(proc.stdout)
            if found and placeholder not in pasted:
                pasted[placeholder] = found.group(1)
    assert set(pasted) == set(PASTED), "the walk-through never printed the token or password it uses"
