"""The app-settings trust boundary: what management accepts is exactly what the worker can run."""

from __future__ import annotations

import pytest

from shared.appsettings import app_fields, check_app_setting, frontend_fields
from shared.errors import InvalidInput


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("runtime", "ruby"),
        ("always_on", "maybe"),
        ("https_only", "sometimes"),
        ("idle_timeout", "-5"),
        ("idle_timeout", "soon"),
        ("entry", "app:app\nrm -rf /"),
        ("PATH", "/evil"),
        ("ld_preload", "/evil.so"),
        ("1BAD", "x"),
        ("WITH-DASH", "x"),
        ("OK", "nul\x00byte"),
    ],
)
def test_settings_the_worker_cannot_use_are_refused(key: str, value: str) -> None:
    with pytest.raises(InvalidInput):
        check_app_setting(key, value)


def test_always_on_needs_a_plan_that_allows_it() -> None:
    check_app_setting("always_on", "true", always_on_allowed=True)
    check_app_setting("always_on", "false", always_on_allowed=False)
    with pytest.raises(InvalidInput, match="plan"):
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


def test_routing_switches_go_to_the_front_ends_not_the_app() -> None:
    settings = {"https_only": "true", "affinity": "false", "KEY": "v"}
    assert frontend_fields(settings) == {"https_only": True}
    assert app_fields(settings, always_on_allowed=False) == {"env": {"KEY": "v"}}
