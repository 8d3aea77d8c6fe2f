"""The base of every wire message."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.errors import InvalidInput

__all__ = ["Contract"]

# How many field errors one refusal lists: enough to fix a message, short enough for a log line.
_ERRORS_SHOWN = 5


class Contract(BaseModel):
    """A frozen message. Unknown fields are ignored, not refused: during a rolling upgrade a newer
    controller may send fields an older role does not know yet."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True, validate_default=False)

    @classmethod
    def parse(cls, data: object, *, what: str | None = None) -> Self:
        """Validate ``data`` (decoded JSON) once; :class:`InvalidInput` says every field that is wrong."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidInput(f"{what or cls.__name__}: {_describe(exc)}") from None

    @classmethod
    def parse_json(cls, raw: bytes | str, *, what: str | None = None) -> Self:
        """Decode and validate in one step (pydantic's parser: no intermediate dicts)."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidInput(f"{what or cls.__name__}: {_describe(exc)}") from None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _describe(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    parts = []
    for error in errors[:_ERRORS_SHOWN]:
        where = ".".join(str(p) for p in error["loc"]) or "(message)"
        parts.append(f"{where}: {error['msg']}")
    more = len(errors) - _ERRORS_SHOWN
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
