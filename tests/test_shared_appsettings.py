"""The app-settings trust boundary: what management accepts is exactly what the worker can run."""

from __future__ import annotations

from typing import Any

import pytest

from roles.worker.apps._spec import SIZES, parse_app_spec
from shared import appsettings
from shared.appsettings import (
    FRONTEND_KEYS,
    IDLE_TIMEOUT_MAX,
    MAX_ENV_BYTES,
    app_fields,
    check_app_setting,
    check_settings,
    frontend_fields,
)
from shared.errors import InvalidInput, LimitReached

LIMITS = SIZES["small"].limits

# Values management once accepted and the worker then refused (or could not start the app with).
BAD = [
    ("runtime", "ruby", "runtime must be one of"),
    ("always_on", "maybe", "always_on must be true or false"),
    ("https_only", "sometimes", "https_only must be true or false"),
    ("idle_timeout", "-5", "whole number of seconds"),
    ("idle_timeout", "soon", "whole number of seconds"),
    ("idle_timeout", "9" * 400, "whole number of seconds"),
    ("idle_timeout", "\u00b2", "whole number of seconds"),
    ("idle_timeout", "\u0663", "whole number of seconds"),
    ("idle_timeout", "0", "whole number of seconds"),
    ("idle_timeout", str(IDLE_TIMEOUT_MAX + 1), "whole number of seconds"),
    ("entry", "app:app\nrm -rf /", "one line"),
    ("entry", "x" * 1025, "at most 1024"),
    ("entry", "app\ud800", "not valid UTF-8"),
    ("PATH", "/evil", "set by the platform"),
    ("ld_preload", "/evil.so", "set by the platform"),
    ("1BAD", "x", "is not valid"),
    ("WITH-DASH", "x", "is not valid"),
    ("X" * 129, "x", "is not valid"),
    ("OK", "nul\x00byte", "NUL"),
    ("OK", "lone \ud800 surrogate", "not valid UTF-8"),
    ("OK", "\udcff", "not valid UTF-8"),
    ("OK", "x" * 4097, "at most 4096"),
]


@pytest.mark.parametrize(("key", "value", "why"), BAD)
def test_settings_the_worker_cannot_use_are_refused_with_what_is_allowed(
    key: str, value: str, why: str
) -> None:
    with pytest.raises(InvalidInput, match=why) as caught:
        check_app_setting(key, value)
    assert len(str(caught.value)) < 300  # a message, not the value echoed back


@pytest.mark.parametrize(("key", "value", "why"), [b for b in BAD if b[0] not in FRONTEND_KEYS])
def test_the_worker_refuses_the_same_values_with_the_same_words(key: str, value: str, why: str) -> None:
    """A value that got past management: the controller passes it on, the worker refuses the site."""
    fields = app_fields({key: value}, always_on_allowed=True)
    with pytest.raises(InvalidInput, match=why) as caught:
        parse_app_spec("shop", {"uid": "u", **fields}, LIMITS)
    assert "site 'shop'" in caught.value.message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("idle_timeout", "1"),
        ("idle_timeout", str(IDLE_TIMEOUT_MAX)),
        ("entry", "x" * 1024),
        ("OK", "x" * 4096),
        ("OK", ""),
        ("OK", "caf\u00e9 \u2603 \U0001f600"),
        ("_X" + "Y" * 126, "v"),
        ("always_on", "ON"),
        ("runtime", "command"),
    ],
)
def test_values_at_the_bounds_pass_both_checks(key: str, value: str) -> None:
    check_app_setting(key, value)
    parse_app_spec("shop", {"uid": "u", **app_fields({key: value}, always_on_allowed=True)}, LIMITS)


def test_each_check_returns_the_typed_value() -> None:
    assert appsettings.idle_timeout("60") == 60
    assert appsettings.idle_timeout(60) == 60
    assert appsettings.boolean("always_on", "Yes") is True
    assert appsettings.boolean("always_on", False) is False
    assert appsettings.runtime("php") == "php"
    assert appsettings.entry("app:app") == "app:app"
    assert appsettings.setting_name("DB_HOST") == "DB_HOST"
    with pytest.raises(InvalidInput):
        appsettings.idle_timeout(True)
    with pytest.raises(InvalidInput):
        appsettings.idle_timeout(1.5)


def test_the_whole_environment_of_a_site_is_bounded() -> None:
    # 20 values of 4,000 characters: each fine alone, 80 KB together (over the kernel-sized cap).
    settings = {f"V{i}": "x" * 4000 for i in range(20)}
    for key, value in settings.items():
        check_app_setting(key, value)
    with pytest.raises(InvalidInput, match=f"at most {MAX_ENV_BYTES} bytes"):
        check_settings(settings)
    with pytest.raises(InvalidInput, match=f"at most {MAX_ENV_BYTES} bytes"):
        parse_app_spec("shop", {"uid": "u", **app_fields(settings, always_on_allowed=True)}, LIMITS)
    # Counted in bytes: multi-byte characters count for what they take.
    assert appsettings.env_bytes({"K": "\u00e9"}) == len("K=\u00e9\0".encode())
    fits = {f"V{i}": "x" * 4000 for i in range(16)}
    check_settings(fits)
    parse_app_spec("shop", {"uid": "u", **app_fields(fits, always_on_allowed=True)}, LIMITS)
    # The worker's own settings are not environment and do not count.
    check_settings({**fits, "entry": "x" * 1024})


def test_the_number_of_settings_is_bounded() -> None:
    with pytest.raises(LimitReached, match="at most 100"):
        check_settings({f"K{i}": "" for i in range(101)})


def test_always_on_needs_a_plan_that_allows_it() -> None:
    check_app_setting("always_on", "true", always_on_allowed=True)
    check_app_setting("always_on", "false", always_on_allowed=False)
    # A plan's limit (409, exit 5), as the plan's other limits are.
    with pytest.raises(LimitReached, match="plan does not allow always on"):
        check_app_setting("always_on", "true", always_on_allowed=False)


def test_site_keys_configure_the_worker_and_the_rest_is_environment() -> None:
    settings = {
        "runtime": "php",
        "entry": "index.php",
        "idle_timeout": "60",
        "always_on": "yes",
        "DB_HOST": "db",
    }
    assert app_fields(settings, always_on_allowed=True) == {
        "runtime": "php",
        "entry": "index.php",
        "idle_timeout": 60,
        "always_on": True,
        "env": {"DB_HOST": "db"},
    }
    assert app_fields({}, always_on_allowed=True) == {}
    spec = parse_app_spec("shop", {"uid": "u", **app_fields(settings, always_on_allowed=True)}, LIMITS)
    assert spec is not None
    assert (spec.runtime, spec.entry, spec.idle_timeout, spec.always_on) == ("php", "index.php", 60.0, True)
    assert spec.env == (("DB_HOST", "db"),)


def test_a_stored_value_that_got_past_management_reaches_the_worker_as_it_is() -> None:
    """The controller never fails on one site's bad value: it is the worker's to refuse, for that site."""
    fields: dict[str, Any] = app_fields({"idle_timeout": "\u00b2", "runtime": "ruby"}, always_on_allowed=True)
    assert fields == {"idle_timeout": "\u00b2", "runtime": "ruby"}


def test_routing_switches_go_to_the_front_ends_not_the_app() -> None:
    settings = {"https_only": "true", "affinity": "false", "KEY": "v"}
    assert frontend_fields(settings) == {"https_only": True}
    assert app_fields(settings, always_on_allowed=False) == {"env": {"KEY": "v"}}


@pytest.mark.parametrize("key", ["LD_AUDIT", "ld_debug_output", "LD_DEBUG", "GLIBC_TUNABLES", "GCONV_PATH"])
def test_loader_variables_are_refused_and_never_reach_a_started_process(key: str) -> None:
    # The sandbox starts as root with the app's environment: LD_AUDIT would load a tenant's library there.
    with pytest.raises(InvalidInput, match="changes how every program loads") as err:
        appsettings.setting_name(key)
    assert err.value.hint is not None and "LD_" in err.value.hint
    assert appsettings.loader_variable(key)
    assert not appsettings.loader_variable("OLD_DATABASE_URL") and not appsettings.loader_variable("GREETING")


@pytest.mark.parametrize(
    ("key", "meant"), [("https_onyl", "https_only"), ("affinty", "affinity"), ("always-on", "always_on")]
)
def test_a_slip_of_a_platform_setting_is_refused_with_the_one_meant(key: str, meant: str) -> None:
    # Stored as an app variable it would change nothing, and say nothing.
    with pytest.raises(InvalidInput, match=f"did you mean {meant}") as caught:
        check_app_setting(key, "true")
    assert key.upper() in (caught.value.hint or "")


@pytest.mark.parametrize("key", ["php_version", "database_url", "secret_key", "HTTPS_ONYL"])
def test_other_names_stay_app_variables(key: str) -> None:
    check_app_setting(key, "x")


@pytest.mark.parametrize(
    ("key", "command"),
    [
        ("instances", "sitecloud site scale"),
        ("scale", "sitecloud site scale"),
        ("hostname", "sitecloud hostname add"),
    ],
)
def test_names_other_commands_set_are_refused_with_that_command(key: str, command: str) -> None:
    # As an app variable, `site set blog instances=3` would have scaled nothing, silently.
    with pytest.raises(InvalidInput, match=command) as caught:
        check_app_setting(key, "3")
    assert caught.value.hint is not None and key.upper() in caught.value.hint
    check_app_setting(key.upper(), "3")  # the app's own variable, by its upper-case name
