"""What makes ``sitecloud`` safe and scriptable: exit codes, usage errors (as JSON too), "did you mean",
and confirmation before a destructive command.

Exit codes (documented in docs/operations.md):

==  ===========================================================================
0   done
1   any other error (the server failed, an unexpected answer)
2   usage: the command line or the input it sent was wrong (HTTP 400)
3   not found (HTTP 404)
4   refused: not signed in or not allowed (HTTP 401, 403), or not confirmed
5   conflict: it exists already, is still in use, or a plan limit or quota stands in the way (409, 413)
6   unavailable: a role cannot be reached now; retrying later may work (503, 429)
130 interrupted (Ctrl-C)
==  ===========================================================================
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Iterable, Sequence
from enum import IntEnum
from typing import Any, NoReturn

from shared.errors import ConfirmationRequired, SitecloudError

__all__ = [
    "CliParser",
    "Confirm",
    "ExitCode",
    "UsageError",
    "ask",
    "did_you_mean",
    "exit_code",
]


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    REFUSED = 4
    CONFLICT = 5
    UNAVAILABLE = 6
    INTERRUPTED = 130


# By the error's stable code first (it says more than the status), then by its HTTP status.
_BY_CODE = {ConfirmationRequired.code: ExitCode.REFUSED}
_BY_STATUS = {
    400: ExitCode.USAGE,
    401: ExitCode.REFUSED,
    403: ExitCode.REFUSED,
    404: ExitCode.NOT_FOUND,
    409: ExitCode.CONFLICT,
    413: ExitCode.CONFLICT,
    429: ExitCode.UNAVAILABLE,
    502: ExitCode.UNAVAILABLE,
    503: ExitCode.UNAVAILABLE,
    504: ExitCode.UNAVAILABLE,
    507: ExitCode.UNAVAILABLE,
}


def exit_code(err: SitecloudError) -> ExitCode:
    return _BY_CODE.get(err.code) or _BY_STATUS.get(err.status, ExitCode.ERROR)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


class UsageError(Exception):
    """The command line does not parse; ``usage`` is the usage line of the (sub)command concerned."""

    def __init__(self, message: str, usage: str, prog: str) -> None:
        super().__init__(message)
        self.message = message
        self.usage = usage
        self.prog = prog

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": "usage", "message": self.message, "hint": f"see `{self.prog} --help`"}}


class CliParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (so ``--json`` can shape it) and suggests close words."""

    # A subcommand's parser reports words it does not know itself, with its own usage line; argparse
    # would hand them up to the top parser, whose usage says nothing of the subcommand's options.
    strict = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No prefixes of long options: `site download NAME --to FILE` (as `backup create --to` and
        # `site backup-download --to` take it) was read as `--token FILE`, answered "the token is
        # not valid", and a prefix would change meaning whenever an option is added.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage(), self.prog)

    def parse_known_args(  # type: ignore[override]  # typeshed's overloads; this keeps the behaviour
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self.strict:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is None or value in choices:
            return
        names = [str(c) for c in choices]
        message = f"invalid choice: {value!r}"
        close = did_you_mean(str(value), names)
        if close is not None:
            message += f" — did you mean {close!r}?"
        else:
            message += f" (choose from {', '.join(names)})"
        raise argparse.ArgumentError(action, message)


# What a destructive command asks: what it will do, and the word to type (None: a yes/no question).
Confirm = Callable[[argparse.Namespace], tuple[str, str | None]]


def ask(a: argparse.Namespace, confirm: Confirm, *, terminal: Callable[[], bool] | None = None) -> None:
    """Ask before a destructive command; ``--yes`` skips; with no terminal to ask on, refuse."""
    if getattr(a, "yes", False):
        return
    what, word = confirm(a)
    is_tty = terminal() if terminal else sys.stdin.isatty() and sys.stderr.isatty()
    if not is_tty:
        raise ConfirmationRequired(
            f"not confirmed: this would {what}",
            hint="pass --yes to confirm (there is no terminal to ask on)",
        )
    if word is None:
        sys.stderr.write(f"This will {what}.\nContinue? [y/N] ")
    else:
        sys.stderr.write(f"This will {what}.\nType {word} to confirm: ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip()
    agreed = answer.lower() in ("y", "yes") if word is None else answer == word
    if not agreed:
        raise ConfirmationRequired("not confirmed: nothing was changed", hint="or pass --yes")
