"""Field types shared by every contract and by management's input checks: one check per kind."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from shared.errors import InvalidInput
from shared.names import validate_site_name
from shared.paths import site_relpath

__all__ = [
    "SHA256_PATTERN",
    "ByteCount",
    "ContentId",
    "Sha256",
    "SiteName",
    "SitePath",
    "UnixUid",
    "VersionNumber",
]


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
