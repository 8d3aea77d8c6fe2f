"""Long options are never taken by a prefix: `site download NAME --to FILE` (the word `backup create`
and `site backup-download` use) was read as `--token FILE` and answered "the token is not valid"."""

from __future__ import annotations

import pytest

from roles.management._cli_ux import UsageError
from roles.management.cli import _parser


def test_a_prefix_of_a_global_option_is_a_usage_error_not_that_option() -> None:
    with pytest.raises(UsageError) as err:
        _parser().parse_args(["site", "download", "blog", "1", "--to", "blog.zip"])
    assert "--to" in str(err.value.args[0])
    with pytest.raises(UsageError):
        _parser().parse_args(["site", "list", "--jso"])
    # Whole options work as before, before or after the command word.
    args = _parser().parse_args(["--token", "t", "site", "download", "blog", "1", "-o", "blog.zip", "--json"])
    assert (args.token, args.json, args.output) == ("t", True, "blog.zip")
