"""What the controller pushes to each role (``PUT /v1/config``): one versioned snapshot per kind.

The controller builds these and sends ``to_json()``; the role's control plane (:mod:`shared.control`)
parses the body once and hands the role its typed snapshot. The JSON is the one roles have always
exchanged (a field not given is left out), so roles a release apart read each other's snapshots
during a rolling upgrade.

A role that can serve the rest of its sites while one cannot (the worker, the front end) parses each
site entry on its own: one it cannot use stays in the snapshot as :class:`Refused` with the reason,
so that site fails alone. The file server and the publisher take a snapshot whole or not at all: a
site left out of the file server's snapshot would have its content moved to the trash.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, ClassVar, Generic, Literal, Self, TypeVar

from pydantic import (
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from shared.acme import AcmeChallenge, parse_challenges
from shared.appsettings import APP_DISK_MIN_MB
from shared.contracts._base import Contract
from shared.contracts.fields import (
    AlwaysOn,
    AppEntry,
    AppEnv,
    AppRuntime,
    ByteCount,
    ConfigVersion,
    ContentId,
    Hostname,
    IdleTimeout,
    PemText,
    SiteName,
    VersionNumber,
    checked,
)
from shared.dns01 import PlatformCertificate
from shared.errors import InvalidInput
from shared.names import validate_hostname, validate_site_name
from shared.states import SiteState

__all__ = [
    "AppLimits",
    "BareSnapshot",
    "ConfigAck",
    "CustomHostname",
    "FileserverSite",
    "FileserverSnapshot",
    "FrontendSite",
    "FrontendSnapshot",
    "ManagementSnapshot",
    "OfflineSite",
    "PublisherAddress",
    "PublisherSite",
    "PublisherSnapshot",
    "QuotaStopEntry",
    "Refused",
    "Snapshot",
    "SnapshotPart",
    "WorkerSite",
    "WorkerSiteContent",
    "WorkerSnapshot",
    "entry_or_refused",
]

E = TypeVar("E", bound="SnapshotPart")
T = TypeVar("T")


class SnapshotPart(Contract):
    """A piece of a snapshot. Only the fields it was given go into its JSON, as they always did (an
    older role reads an absent ``serve_as`` as "its own name", not a ``null``). Empty defaults come
    from factories: pydantic deep-copies a literal ``[]`` for every one of 100k entries."""

    model_config = ConfigDict(populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


@dataclass(frozen=True, slots=True)
class Refused:
    """An entry of a snapshot that cannot be used, with why; the rest of the snapshot stands.

    ``raw`` is the entry as it came, sent on as it is: a value stored past management's checks is
    refused by the role for that one site, with the same message management would have given."""

    reason: str
    raw: Any = None


def _invalid(reason: str) -> PydanticCustomError:
    return PydanticCustomError("invalid", "{reason}", {"reason": reason})


def entry_or_refused(model: type[E], name: str, raw: Mapping[str, Any]) -> E | Refused:
    """Build one site's entry from the producer's values, or keep them as :class:`Refused`."""
    try:
        return model.parse(dict(raw), what=f"site {name!r}")
    except InvalidInput as exc:
        return Refused(str(exc), dict(raw))


def _site_key(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidInput("a site name must be text")
    try:
        return validate_site_name(name)
    except InvalidInput as exc:
        raise InvalidInput(f"site {name!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class _SiteMap:
    """Validation of ``{site name: entry}``: whole (any bad entry refuses the message, naming the site)
    or per entry (a bad one becomes :class:`Refused`)."""

    model: type[SnapshotPart]
    tolerant: bool

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(self._dump),
        )

    def _validate(self, raw: Any) -> dict[str, Any]:
        if isinstance(raw, Mapping) and all(isinstance(v, SnapshotPart | Refused) for v in raw.values()):
            return dict(raw)  # built by the producer: its entries are checked already
        if not isinstance(raw, dict):
            raise PydanticCustomError("invalid", "must be an object of site name to site entry")
        if all(_site_name_ok(name) for name in raw):
            # Every entry at once (one call into pydantic's core); the slow path only says what is wrong.
            with contextlib.suppress(ValidationError):
                return _adapter(self.model).validate_python(raw)
        out: dict[str, Any] = {}
        for name, value in raw.items():
            try:
                out[_site_key(name)] = self.model.parse(value, what=f"site {name!r}")
            except InvalidInput as exc:
                if not self.tolerant:
                    raise _invalid(str(exc)) from None
                out[str(name)] = Refused(str(exc), value)
        return out

    def _dump(self, entries: dict[str, Any]) -> dict[str, Any]:
        usable = {name: e for name, e in entries.items() if not isinstance(e, Refused)}
        dumped: dict[str, Any] = _adapter(self.model).dump_python(
            usable, mode="json", by_alias=True, exclude_unset=True
        )
        if len(usable) == len(entries):
            return dumped
        return {name: (e.raw if isinstance(e, Refused) else dumped[name]) for name, e in entries.items()}


@cache
def _adapter(model: type[SnapshotPart]) -> TypeAdapter[dict[str, Any]]:
    return TypeAdapter(dict[str, model])  # type: ignore[valid-type]


def _site_name_ok(name: object) -> bool:
    try:
        _site_key(name)
    except InvalidInput:
        return False
    return True


class _Tolerant(Generic[T]):
    """A part of a snapshot its role can do without: one it cannot use becomes :class:`Refused`."""

    def __init__(self, parse: Callable[[Any], T], dump: Callable[[T], Any]) -> None:
        self._parse, self._dump = parse, dump

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(self._serialize),
        )

    def _validate(self, raw: Any) -> T | Refused:
        try:
            return self._parse(raw)
        except InvalidInput as exc:
            return Refused(str(exc), raw)

    def _serialize(self, value: Any) -> Any:
        return value.raw if isinstance(value, Refused) else self._dump(value)


def _challenges(raw: Any) -> tuple[AcmeChallenge, ...]:
    if isinstance(raw, tuple) and all(isinstance(c, AcmeChallenge) for c in raw):
        return raw
    return tuple(parse_challenges(raw))


def _wildcard(raw: Any) -> PlatformCertificate | None:
    return raw if isinstance(raw, PlatformCertificate) else PlatformCertificate.parse(raw)


class Snapshot(SnapshotPart):
    """What every snapshot has: its generation. A role keeps the newest it was given."""

    # The kind of role it is for.
    kind: ClassVar[str] = ""

    version: ConfigVersion


# -- front end -------------------------------------------------------------------------------------


class CustomHostname(SnapshotPart):
    """A custom hostname with a certificate of its own, served by SNI (a plain one is just its name)."""

    name: Hostname
    cert: PemText | None = None
    key: PemText | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> Self:
        if (self.cert is None) != (self.key is None):
            raise _invalid(f"hostname {self.name!r}: 'cert' and 'key' must both be PEM text")
        return self


def _hostname_entry(raw: Any) -> str | CustomHostname:
    if isinstance(raw, str | CustomHostname):
        return raw if isinstance(raw, CustomHostname) else validate_hostname(raw)
    if not isinstance(raw, dict):
        raise InvalidInput("a hostname is a name or {name, cert, key}")
    return CustomHostname.parse(raw, what="hostname")


# A custom hostname as a snapshot gives it: its name, or {name, cert, key}.
_HostnameEntry = Annotated[
    str | CustomHostname,
    checked(_hostname_entry),
    PlainSerializer(lambda h: h if isinstance(h, str) else h.to_json()),
]


class QuotaStopEntry(SnapshotPart):
    """A site over a daily quota of its plan: what ran out and until when (visitors get the quota page)."""

    what: Literal["bandwidth", "cpu"]
    limit: float
    unit: str = Field(max_length=16)
    # ISO time (UTC), shown on the page as it is.
    until: str = Field(max_length=40)


class FrontendSite(SnapshotPart):
    # "<host>:<port>" over TLS, or "http://<loopback ip>:<port>" (the front end checks each once).
    workers: list[str] = Field(default_factory=list)
    # How many of ``workers``, in order, take the site's requests (its instances); the rest stand by,
    # taking them only while those cannot. 0: all of them. One instance means one app, with one
    # writable folder: balanced over two workers, an app's SQLite database or PHP sessions would split.
    active: int = Field(default=0, ge=0, le=1000)
    # After a slot swap: the site whose workers answer this site's host names.
    serve_as: SiteName | None = None
    hostnames: list[_HostnameEntry] = Field(default_factory=list)
    https_only: bool = False
    hsts: bool = False
    affinity: bool = False
    # A per-site request body limit; absent: the front end's own.
    max_body_bytes: ByteCount | None = None
    quota_stop: QuotaStopEntry | None = None


class OfflineSite(SnapshotPart):
    """A site that exists but serves nothing now: its visitors are told so, and only that."""

    # Stopped by its owner, or of a suspended subscription (never running: that one is in ``sites``).
    state: Annotated[SiteState, Field(strict=False)]
    hostnames: list[_HostnameEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_serving(self) -> Self:
        if self.state.serving:
            raise _invalid(f"an offline site cannot be {self.state}")
        return self


class FrontendSnapshot(Snapshot):
    kind: ClassVar[str] = "frontend"

    domain: Hostname
    sites: Annotated[dict[str, FrontendSite | Refused], _SiteMap(FrontendSite, tolerant=True)] = Field(
        default_factory=dict
    )
    # Sites that exist but do not serve (stopped, suspended): their host names get a page saying so
    # rather than "no site here". Apart from ``sites`` so that a front end a release older, which
    # reads only ``sites``, keeps answering them as it did.
    offline: Annotated[dict[str, OfflineSite | Refused], _SiteMap(OfflineSite, tolerant=True)] = Field(
        default_factory=dict
    )
    # HTTP-01 answers of the ACME orders in flight (the front ends answer them for every host).
    acme_challenges: Annotated[
        tuple[AcmeChallenge, ...] | Refused, _Tolerant(_challenges, lambda cs: [c.to_json() for c in cs])
    ] = ()
    # The platform's wildcard from ACME for <site>.<domain>; absent: the cloud CA's one is served.
    wildcard: Annotated[
        PlatformCertificate | Refused | None, _Tolerant(_wildcard, lambda w: w.to_json() if w else None)
    ] = None


# -- worker ----------------------------------------------------------------------------------------


class AppLimits(SnapshotPart):
    """A site's app limits; an absent one is the worker size's default."""

    memory_mb: int | None = Field(default=None, ge=16, le=1024 * 1024)
    # Share of one CPU (100 = one whole core).
    cpu_percent: int | None = Field(default=None, ge=1, le=100 * 1024)
    nofile: int | None = Field(default=None, ge=16, le=1024 * 1024)
    nproc: int | None = Field(default=None, ge=4, le=1024 * 1024)
    cpu_seconds: int | None = Field(default=None, ge=1, le=10**9)
    # The app's home and temp directory (the plan's storage).
    disk_mb: int | None = Field(default=None, ge=APP_DISK_MIN_MB, le=1024 * 1024)


class WorkerSiteContent(SnapshotPart):
    """What the worker needs to keep a site's content in step, even while its app settings are refused."""

    # The site's content id (on the wire ``uid``, as it always was): never a Unix uid.
    content_id: ContentId = Field(alias="uid")


class WorkerSite(WorkerSiteContent):
    """A site the worker serves; the app fields come from its app settings (``shared.appsettings``)."""

    # Absent: detected from the content of the version served.
    runtime: AppRuntime | None = None
    entry: AppEntry = ""
    env: AppEnv = Field(default_factory=dict)
    always_on: AlwaysOn = False
    idle_timeout: IdleTimeout | None = None
    limits: AppLimits | None = None
    # How many times the owner asked to restart the app: a new value replaces its processes.
    restarts: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    # The site's subscription: the worker shares app slots and starts out per subscription, so one
    # tenant's sites cannot crowd out another's. 0: not said (an older controller); the site is its own.
    subscription: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0

    @property
    def has_app_fields(self) -> bool:
        """Whether the entry says anything about an app (a plain static site's says nothing)."""
        return bool(self.model_fields_set - {"content_id", "subscription"})


class WorkerSnapshot(Snapshot):
    kind: ClassVar[str] = "worker"

    # The control URL of the file server to pull content from ("": none reachable yet).
    fileserver: str = ""
    sites: Annotated[dict[str, WorkerSite | Refused], _SiteMap(WorkerSite, tolerant=True)] = Field(
        default_factory=dict
    )
    # Content ids of this worker's sites that exist but do not serve now (stopped, or of a suspended
    # subscription): their apps' homes are kept. The home of a site neither here nor in ``sites`` is
    # removed (a deleted site, or one moved to another worker). None: a controller that does not say,
    # so nothing is removed.
    kept: list[ContentId] | None = None

    def content_ids(self) -> tuple[dict[str, str], dict[str, str]]:
        """Site → content id of every site whose content the worker keeps (one whose app settings are
        refused too, ready for when they are fixed), and the sites it cannot even hold, with why."""
        held: dict[str, str] = {}
        failed: dict[str, str] = {}
        for name, entry in self.sites.items():
            if isinstance(entry, WorkerSite):
                held[name] = entry.content_id
                continue
            try:
                _site_key(name)
                held[name] = WorkerSiteContent.parse(entry.raw).content_id
            except InvalidInput:
                failed[name] = entry.reason
        return held, failed


# -- file server -----------------------------------------------------------------------------------


class FileserverSite(SnapshotPart):
    # On the wire ``uid``: the content id the site's store is kept under.
    content_id: ContentId = Field(alias="uid")
    quota_bytes: ByteCount
    # The plan's retention: a version goes once it is neither among the last ``keep_versions`` nor
    # younger than ``keep_days`` (0: the file server's default count, no age rule).
    keep_versions: int = Field(default=0, ge=0, le=10**6)
    keep_days: int = Field(default=0, ge=0, le=10**5)


class FileserverSnapshot(Snapshot):
    kind: ClassVar[str] = "fileserver"

    sites: Annotated[dict[str, FileserverSite], _SiteMap(FileserverSite, tolerant=False)] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _one_site_per_content_id(self) -> Self:
        owner: dict[str, str] = {}
        for name, site in self.sites.items():
            other = owner.setdefault(site.content_id, name)
            if other != name:
                raise _invalid(f"site {name!r}: uid {site.content_id} is used by site {other!r} too")
        return self


# -- publisher -------------------------------------------------------------------------------------


class PublisherSite(SnapshotPart):
    content_id: ContentId = Field(alias="uid")
    quota_bytes: ByteCount
    # Publishing user name -> its password hash (scrypt).
    users: dict[Annotated[str, Field(min_length=1, max_length=256)], str] = Field(default_factory=dict)
    # The site names (addresses) this content answers, when not just its own: after a slot swap, the
    # other slot's. Publishing credentials go with the address, as Azure's slot credentials do.
    addresses: list[SiteName] | None = None
    # Control URLs of the workers serving the site: a deploy follows its build in their logs.
    workers: list[Annotated[str, Field(pattern=r"^https://", max_length=2048)]] = Field(default_factory=list)
    # Workers holding the site that this publisher cannot reach (on another host, not advertised):
    # whether they serve a deploy is not for it to judge. 0 (absent): ``workers`` are all there are.
    unreached_workers: int = Field(default=0, ge=0, le=10**6)
    # A stopped site is published to as a running one; what is published serves once it is started.
    state: Annotated[SiteState, Field(strict=False)] = SiteState.RUNNING
    # The site's subscription: the publisher shares its deploy slots out per subscription, so one
    # tenant's sites cannot queue another's deploys. 0: not said (an older controller); the site is its own.
    subscription: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0


class PublisherSnapshot(Snapshot):
    kind: ClassVar[str] = "publisher"

    # The file server's control URL; "": none runs (publishing answers "storage is unavailable").
    fileserver: str = Field(default="", pattern=r"^(https://.+)?$", max_length=2048)
    # How a site's address reads ("https://{site}.<domain>/"), to tell a publisher where it went live.
    site_url: str | None = Field(default=None, pattern=r"\{site\}")
    sites: Annotated[dict[str, PublisherSite], _SiteMap(PublisherSite, tolerant=False)] = Field(
        default_factory=dict
    )
    # Sites of suspended subscriptions: their users' logins are refused, saying why. Apart from
    # ``sites`` so that a publisher a release older, which reads only ``sites``, refuses them too.
    suspended: Annotated[dict[str, PublisherSite], _SiteMap(PublisherSite, tolerant=False)] = Field(
        default_factory=dict
    )


class ConfigAck(Contract):
    """A role's answer to a push: the version it serves with now (a stale push leaves it older)."""

    config_version: VersionNumber


# -- management ------------------------------------------------------------------------------------

# A host name or an IP address (v4 or v6), as people and roles are told to reach a host.
_HostOrAddress = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[0-9A-Za-z.:_-]+$")]
_Port = Annotated[int, Field(ge=1, le=65535)]


class PublisherAddress(SnapshotPart):
    """Where the cloud's publisher runs, as management needs it: the URL it forwards web deploys to
    (over mTLS), and the host and ports it tells tenants to publish to."""

    control_url: str = Field(pattern=r"^https://", max_length=2048)
    public_host: _HostOrAddress
    ftp_port: _Port
    deploy_port: _Port


class ManagementSnapshot(Snapshot):
    """Management reads tenants and sites from the DB itself; what it learns from the controller is
    where the roles it hands out addresses of run now."""

    kind: ClassVar[str] = "management"

    # None: no publisher runs that management can reach (none placed, or every one stopped).
    publisher: PublisherAddress | None = None


# -- roles that take no sites ----------------------------------------------------------------------


class BareSnapshot(Snapshot):
    """The snapshot of a role the controller configures nothing of yet (management): its version."""

    kind: ClassVar[str] = ""
