"""Field types shared by every contract and by management's input checks: one check per kind."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, Field, PlainValidator
from pydantic_core import PydanticCustomError

from shared import appsettings
from shared.errors import InvalidInput, SitecloudError
from shared.names import validate_hostname, validate_site_name
from shared.paths import site_relpath

__all__ = [
    "SHA256_PATTERN",
    "AlwaysOn",
    "AppEntry",
    "AppEnv",
    "AppRuntime",
    "ByteCount",
    "ConfigVersion",
    "ContentId",
    "Hostname",
    "IdleTimeout",
    "PemText",
    "Sha256",
    "SiteName",
    "SitePath",
    "UnixUid",
    "VersionNumber",
    "checked",
]

T = TypeVar("T")


def _site_name(value: str) -> str:
    try:
        return validate_site_name(value)
    except InvalidInput as exc:  # pydantic reports a ValueError against the field it came from
        raise ValueError(str(exc)) from None


def _site_path(value: str) -> str:
    try:
        return site_relpath(value, allow_root=False)
    except InvalidInput as exc:  # the boundary's own message, without pydantic's "Value error, "
        raise PydanticCustomError("site_path", "{reason}", {"reason": str(exc)}) from None


# A site's name as visitors and tenants see it (a DNS label).
SiteName = Annotated[str, AfterValidator(_site_name)]
# A site's immutable content id (hex uuid): storage is keyed by it, so a name used again starts empty.
ContentId = Annotated[str, Field(pattern=r"^[0-9A-Za-z_-]{1,64}$")]
# A Unix user id a worker runs a site's app as; never the content id.
UnixUid = Annotated[int, Field(ge=1, le=2**32 - 2)]
# A content version: 0 is "nothing published yet".
VersionNumber = Annotated[int, Field(ge=0, le=2**63 - 1)]
# A size in bytes, as a quota or a counter.
ByteCount = Annotated[int, Field(ge=0, le=2**63 - 1)]
# A blob's name: the sha256 of its bytes, in lower-case hex.
SHA256_PATTERN = r"^[0-9a-f]{64}$"
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]
# A file or directory inside a site, normalised by the one path boundary (never the root itself).
SitePath = Annotated[str, AfterValidator(_site_path)]


def checked(check: Callable[[Any], T]) -> PlainValidator:
    """A field validator from one of the checks that raise :class:`InvalidInput` (the same function
    management runs on user input): its message becomes the field's error as it is."""

    def validate(value: Any) -> T:
        try:
            return check(value)
        except SitecloudError as exc:
            raise PydanticCustomError("invalid", "{reason}", {"reason": str(exc)}) from None

    return PlainValidator(validate)


def _app_env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidInput("env must be an object of strings")
    if len(value) > appsettings.MAX_SETTINGS:
        raise InvalidInput(f"at most {appsettings.MAX_SETTINGS} app settings are allowed")
    env = {appsettings.setting_name(k): appsettings.env_value(k, v) for k, v in sorted(value.items())}
    appsettings.check_settings(env)
    return env


# A snapshot's (or pushed config's) generation: 1 and up.
ConfigVersion = Annotated[int, Field(ge=1, le=2**63 - 1)]
# A fully qualified host name (a custom hostname, the cloud's domain, a role host), lower-cased.
Hostname = Annotated[str, checked(validate_hostname)]
# A PEM certificate chain or key.
PemText = Annotated[str, Field(min_length=1, max_length=1024 * 1024, pattern=r"BEGIN")]
# A site's app settings, with the checks of shared.appsettings (what management applies when set).
AppRuntime = Annotated[appsettings.Runtime, checked(appsettings.runtime)]
AppEntry = Annotated[str, checked(appsettings.entry)]
AppEnv = Annotated[dict[str, str], checked(_app_env)]
IdleTimeout = Annotated[int, checked(appsettings.idle_timeout)]
# Whether an app keeps running when idle, as settings hold it: true/false or their text forms.
AlwaysOn = Annotated[bool, checked(partial(appsettings.boolean, "always_on"))]
