"""One typed model per request and response body of the management REST API (pydantic v2).

Request bodies are validated with these models before a handler sees them, and ``/openapi.json`` is
generated from the same models (:mod:`roles.management._openapi`), so the document cannot say other
than the code does. Bounds and name rules are not repeated here: they are imported from where the
rules live (``shared.names``, ``shared.appsettings``, the store's plan bounds), and name fields run
the same ``validate_*`` functions the service runs, so a refusal reads the same from every door.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel, ValidationError

from roles.management._accounts import MAX_PASSWORD, MIN_PASSWORD
from roles.management._fabric import FABRICS, KINDS
from roles.management._paging import DEFAULT_LIMIT, MAX_LIMIT
from roles.management._site_backups import BACKUP_EVERY_MAX, BACKUP_KEEP_MAX
from roles.management._store import (
    COMPUTE_MODES,
    COUNT_MAX,
    DAILY_QUOTA_MAX,
    ID_MAX,
    INSTANCES_MAX,
    KEEP_DAYS_MAX,
    KEEP_VERSIONS_MAX,
    SCALE_MAX,
    STORAGE_MB_MAX,
    WORKER_SIZES,
)
from shared.acme import MAX_DIRECTORY_URL
from shared.appsettings import ENV_NAME, MAX_VALUE_CHARS
from shared.contracts.apps import COMMAND_CHARS_MAX, COMMAND_SECONDS_MAX
from shared.dns01 import TSIG_ALGORITHMS
from shared.errors import InvalidInput
from shared.names import (
    HOSTNAME_MAX,
    NAME_MAX,
    NAME_PATTERN,
    SITE_NAME_MAX,
    SITE_NAME_PATTERN,
    SLOT_NAME_PATTERN,
    CertState,
    HostnameState,
    validate_name,
    validate_site_name,
    validate_slot_name,
)

__all__ = [
    "Answer",
    "Body",
    "Error",
    "ListQuery",
    "Query",
    "validated",
]

Json = dict[str, Any]
M = TypeVar("M", bound=BaseModel)


def _named(what: str) -> AfterValidator:
    """Plan, tenant, user and token names are checked by :func:`validate_name`, as the service does."""

    def check(value: str) -> str:
        return validate_name(value, what=what)

    return AfterValidator(check)


_NAME_DOC = Field(json_schema_extra={"minLength": 1, "maxLength": NAME_MAX, "pattern": NAME_PATTERN})
PlanName = Annotated[str, _named("plan"), _NAME_DOC]
TenantName = Annotated[str, _named("tenant"), _NAME_DOC]
UserName = Annotated[str, _named("user"), _NAME_DOC]
TokenName = Annotated[str, _named("token"), _NAME_DOC]
SiteName = Annotated[
    str,
    AfterValidator(validate_site_name),
    Field(json_schema_extra={"minLength": 1, "maxLength": SITE_NAME_MAX, "pattern": SITE_NAME_PATTERN}),
]
Time = Annotated[
    str | None,
    Field(description="ISO 8601 date-time (UTC); null: never", json_schema_extra={"format": "date-time"}),
]
Hostname = Annotated[str, Field(min_length=1, max_length=HOSTNAME_MAX)]
Count = Annotated[int, Field(ge=0, le=COUNT_MAX)]
Daily = Annotated[int | None, Field(ge=1, le=DAILY_QUOTA_MAX, description="null: unlimited")]
Secret = Annotated[str, Field(description="shown in this answer only")]


class Body(BaseModel):
    """A request body: exact JSON types (no "2" for 2), no fields but the known ones."""

    model_config = ConfigDict(strict=True, extra="forbid")
    # How a refusal names the thing the body describes: "unknown field(s) for a plan".
    what: ClassVar[str] = "request"

    def fields(self) -> Json:
        """The fields the caller sent, as the service takes them."""
        return self.model_dump(exclude_unset=True)


class Answer(BaseModel):
    """A response body; more fields may come in later versions, so clients must allow them."""

    model_config = ConfigDict(extra="allow")


class Query(BaseModel):
    """Query parameters: text converted to the field's type; no parameters but the known ones."""

    model_config = ConfigDict(extra="forbid")


class ListQuery(Query):
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="items per page")
    cursor: str | None = Field(None, max_length=512, description="the next_cursor of the previous page")


NextCursor = Annotated[
    str | None, Field(description="pass as ?cursor= for the next page; null: this is the last")
]


# -- errors


class ErrorDetail(Answer):
    code: str = Field(description="stable: invalid_input, not_found, already_exists, ...")
    message: str = Field(description="what is wrong")
    hint: str | None = Field(None, description="what is allowed, or what to do next")


class Error(Answer):
    """Every 4xx and 5xx answer."""

    error: ErrorDetail


# -- meta and accounts


class Health(Answer):
    status: str
    code_version: str | None = None


class OpenApiDocument(Answer):
    """The OpenAPI 3.1 document."""

    openapi: str


class Me(Answer):
    admin: bool
    tenant: str | None
    username: str | None


class TokenRequest(Body):
    what = "sign-in"
    username: str
    password: str
    name: Annotated[str, Field(json_schema_extra={"maxLength": NAME_MAX, "pattern": NAME_PATTERN})] = "cli"


class TokenCreate(Body):
    what = "token"
    name: TokenName


class Token(Answer):
    id: int
    name: str | None
    prefix: str
    created_at: Time
    last_used_at: Time


class TokenCreated(Token):
    token: Secret


class TokenList(Answer):
    tokens: list[Token]
    next_cursor: NextCursor = None


class TenantCreatedToken(Answer):
    id: int
    name: str
    token: Secret


Password = Annotated[str, Field(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)]


class SignUp(Body):
    what = "sign-up"
    username: UserName
    password: Password


class UserCreate(Body):
    what = "user"
    username: UserName
    password: Password | None = Field(None, description="generated and returned once when left out")
    tenant: str | None = Field(None, description="leave out for an admin account")


class User(Answer):
    id: int
    username: str
    admin: bool
    tenant: str | None
    created_at: Time = None
    last_sign_in_at: Time = None
    password: str | None = Field(None, description="only when generated, in the create answer")


class UserList(Answer):
    users: list[User]
    next_cursor: NextCursor = None


class UserListQuery(ListQuery):
    tenant: str | None = Field(None, max_length=NAME_MAX, description="only this tenant's users")


class CloudSettings(Answer):
    signup_enabled: bool
    dns_resolvers: list[str]
    ip_dns_services: list[str]
    acme_directory_url: str
    acme_ca_bundle: str
    acme_email: str
    wildcard_dns01: bool
    dns_update_server: str
    dns_update_zone: str
    dns_update_key_name: str
    dns_update_key_algorithm: str
    dns_update_key_secret_set: bool = Field(description="whether a TSIG secret is stored (it is never shown)")
    wildcard_certificate: WildcardCertificate


class WildcardCertificate(Answer):
    """The platform's wildcard certificate from ACME by DNS-01."""

    state: Literal["off", "pending", "issuing", "valid", "failed"]
    names: list[str]
    until: dt.datetime | None
    reason: str | None
    retry_at: dt.datetime | None


class CloudSettingsUpdate(Body):
    what = "settings change"
    signup_enabled: bool | None = None
    dns_resolvers: list[str] | None = Field(
        None, description="where custom hostname ownership is checked: 'ip' or 'ip:port'; [] = the system's"
    )
    ip_dns_services: list[str] | None = Field(
        None, description="wildcard DNS services (nip.io, ...) no custom hostname may be under"
    )
    acme_directory_url: str | None = Field(
        None,
        max_length=MAX_DIRECTORY_URL,
        description="ACME directory for custom hostnames' certificates: an https:// URL, "
        "'letsencrypt' (default), 'letsencrypt-staging', or 'off' / ''",
    )
    acme_ca_bundle: str | None = Field(
        None, description="PEM CA certificates to trust for the ACME directory; '' = the system's"
    )
    acme_email: str | None = Field(None, description="contact address given to the ACME CA; '' = none")
    wildcard_dns01: bool | None = Field(
        None,
        description="get the platform's wildcard *.<domain> by ACME DNS-01 through the DNS update method "
        "below; needs all of it, and ACME on",
    )
    dns_update_server: str | None = Field(
        None,
        max_length=300,
        description="DNS server taking RFC 2136 updates: 'host', 'host:port', '[ipv6]:port'",
    )
    dns_update_zone: str | None = Field(
        None, max_length=253, description="the zone holding _acme-challenge.<domain>"
    )
    dns_update_key_name: str | None = Field(None, max_length=253, description="the TSIG key's name")
    dns_update_key_algorithm: Literal[TSIG_ALGORITHMS] | None = None  # type: ignore[valid-type]
    dns_update_key_secret: str | None = Field(
        None,
        max_length=1000,
        json_schema_extra={"writeOnly": True},
        description="the TSIG secret, base64; never shown back",
    )


# -- plans, tenants, subscriptions


class _PlanQuotas(BaseModel):
    max_sites: Count | None = None
    storage_mb: Annotated[int, Field(ge=1, le=STORAGE_MB_MAX)] | None = None
    bandwidth_mb_per_day: Daily = None
    cpu_minutes_per_day: Daily = None
    max_custom_hostnames: Count | None = Field(
        None, description="custom host names across all sites of a subscription"
    )
    compute_mode: Literal[COMPUTE_MODES] | None = None  # type: ignore[valid-type]
    worker_size: Literal[WORKER_SIZES] | None = Field(  # type: ignore[valid-type]
        None, description="required when compute_mode is reserved"
    )
    always_on: bool | None = None
    max_instances_per_site: Annotated[int, Field(ge=1, le=INSTANCES_MAX)] | None = None
    keep_versions: Annotated[int, Field(ge=1, le=KEEP_VERSIONS_MAX)] | None = Field(
        None, description="content versions each site keeps at least (default 20)"
    )
    keep_days: Annotated[int, Field(ge=0, le=KEEP_DAYS_MAX)] | None = Field(
        None, description="and every version of the last this many days (default 0)"
    )
    # Checked by the service alone, whose refusal names the cloud's floor (an hour unless the cloud
    # sets SITECLOUD_BACKUP_MIN_SECONDS); the bounds here are for the document.
    backup_every_seconds: (
        Annotated[int, Field(json_schema_extra={"minimum": 0, "maximum": BACKUP_EVERY_MAX})] | None
    ) = Field(
        None,
        description="write each site's current content as a zip this often (0: off, the default; "
        "else at least an hour unless the cloud allows less)",
    )
    backup_keep: Annotated[int, Field(ge=1, le=BACKUP_KEEP_MAX)] | None = Field(
        None, description="scheduled backups each site keeps, the newest (default 7)"
    )


class PlanCreate(Body, _PlanQuotas):
    what = "plan"
    name: PlanName
    max_sites: Count
    storage_mb: Annotated[int, Field(ge=1, le=STORAGE_MB_MAX)]
    public: bool | None = None
    retired: bool | None = None


class PlanUpdate(Body, _PlanQuotas):
    what = "plan update"
    public: bool | None = None
    retired: bool | None = None


class Quotas(Answer):
    max_sites: int
    storage_mb: int
    bandwidth_mb_per_day: int | None
    cpu_minutes_per_day: int | None
    max_custom_hostnames: int
    compute_mode: Literal[COMPUTE_MODES]  # type: ignore[valid-type]
    worker_size: Literal[WORKER_SIZES] | None  # type: ignore[valid-type]
    always_on: bool
    max_instances_per_site: int


class Plan(Quotas):
    id: int
    name: str
    public: bool
    retired: bool
    keep_versions: int = Field(description="content versions each site keeps at least")
    keep_days: int = Field(description="and every version of the last this many days")
    backup_every_seconds: int = Field(0, description="scheduled backups of each site this often; 0: off")
    backup_keep: int = Field(7, description="scheduled backups each site keeps")
    subscriptions: int = Field(0, description="how many subscriptions use it (admins)")
    over_limit: list[str] = Field(
        [],
        description="after an update: the subscriptions that now hold more than the plan allows "
        "(they keep it; new sites, hostnames and instances are refused until they are under)",
    )


class PlanList(Answer):
    plans: list[Plan]
    next_cursor: NextCursor = None


class TenantCreate(Body):
    what = "tenant"
    name: TenantName


class Tenant(Answer):
    id: int
    name: str
    subscriptions: int = 0
    sites: int = 0
    users: int = 0
    created_at: Time = None


class TenantList(Answer):
    tenants: list[Tenant]
    next_cursor: NextCursor = None


class TenantUser(Answer):
    username: str
    created_at: Time = None
    last_sign_in_at: Time = None


class TenantDetail(Answer):
    """A tenant with its subscriptions, sites and users."""

    id: int
    name: str
    created_at: Time = None
    subscriptions: list[Subscription]
    sites: list[Site]
    users: list[TenantUser]


class ResetLink(Answer):
    username: str
    url: str = Field(description="the portal page that sets a new password; works once")
    expires_at: dt.datetime


class SubscriptionCreate(Body):
    what = "subscription"
    plan: PlanName
    tenant: str | None = Field(None, description="admins: the tenant; tenants: leave out")


class SubscriptionUpdate(Body):
    what = "subscription update"
    plan: PlanName = Field(
        description="the plan to move to; refused while the subscription holds more than it allows"
    )


class SubscriptionUsage(Answer):
    sites: int
    custom_hostnames: int
    storage_bytes: int | None = Field(description="from the fileserver; null when it cannot be asked now")


class Subscription(Answer):
    id: int
    tenant: str
    plan: str
    state: Literal["active", "suspended"]
    created_at: Time = None
    quotas: Quotas
    usage: SubscriptionUsage
    site_names: list[str] = []
    verification_id: str = Field(
        description="the value of a TXT record asuid.<hostname> that proves a custom hostname is yours"
    )


class SubscriptionList(Answer):
    subscriptions: list[Subscription]
    next_cursor: NextCursor = None


class SubscriptionListQuery(ListQuery):
    tenant: str | None = Field(None, max_length=NAME_MAX, description="only this tenant's")
    plan: str | None = Field(None, max_length=NAME_MAX, description="only subscriptions to this plan")
    state: Literal["active", "suspended"] | None = None


# -- sites


class SiteCreate(Body):
    what = "site"
    name: SiteName
    subscription: Annotated[int, Field(ge=0, le=ID_MAX)]


class SiteVersion(Answer):
    version: int
    time: float = Field(description="seconds since the epoch")
    source: Literal["ftp", "deploy", "git", "rollback"] = Field(
        description="ftp: an FTP upload (a session's uploads in a row are one entry); deploy: a zip or web "
        "deploy; git: a git push; rollback: a rollback to an earlier version"
    )
    files: int
    total_bytes: int


class SiteVersions(Answer):
    site: str
    versions: list[SiteVersion]
    current: int | None = Field(
        None,
        description="the version the site's content is now, which its workers serve (none: nothing published)",
    )
    next_cursor: NextCursor = None


class SiteBackup(Answer):
    name: str = Field(description="the backup's file name: <UTC stamp>-v<version>.zip")
    version: int = Field(description="the content version it holds")
    created_at: str = Field(
        description="when it was written (UTC)", json_schema_extra={"format": "date-time"}
    )
    bytes: int


class SiteBackups(Answer):
    site: str
    every_seconds: int = Field(description="the plan's interval; 0: scheduled backups are off")
    every: str = Field(description="the same, for people: 1d, 6h, 30m or off")
    keep: int = Field(description="how many the site keeps, the newest")
    backups: list[SiteBackup] = Field(description="oldest first")
    next_cursor: NextCursor = None


class Rollback(Body):
    what = "rollback"
    version: Annotated[int, Field(ge=1, description="default: the one before the newest")] | None = None


class RolledBack(Answer):
    site: str
    version: int
    rolled_back_to: int
    total_bytes: int | None = None


class Backup(Answer):
    format: str = Field(description="sitecloud-backup/1")
    alembic_revision: str = Field(description="the schema revision the rows were written under")
    dialect: str = Field(description="sqlite or postgresql: where they were read from")
    created_at: str
    tables: dict[str, list[dict[str, Any]]] = Field(description="table name → its rows, as column → value")
    site_versions: dict[str, int] = Field(description="each site's content version when the rows were read")


class BackupRestore(Body):
    what = "backup"
    format: Literal["sitecloud-backup/1"]
    alembic_revision: Annotated[str, Field(min_length=1, max_length=64)]
    tables: dict[str, list[dict[str, Any]]]
    dialect: str | None = None
    created_at: str | None = None
    site_versions: dict[str, int] | None = None
    force: bool = Field(False, description="replace this cloud's plans, tenants, users and sites")


class Restored(Answer):
    format: str
    restored: dict[str, int] = Field(description="rows put in, per table")


class SiteCommand(Body):
    what = "command"
    command: Annotated[str, Field(min_length=1, max_length=COMMAND_CHARS_MAX)] = Field(
        description="run once with /bin/sh -c in the site's app sandbox, as its app runs (its packages, "
        "settings and writable folder), e.g. `python manage.py migrate`"
    )
    timeout: Annotated[float, Field(gt=0, le=COMMAND_SECONDS_MAX)] = Field(
        60.0, description="seconds it may run before it is stopped"
    )


class SiteCommandResult(Answer):
    site: str
    exit_code: int | None = Field(description="its exit status; none when it was stopped at a limit")
    output: str = Field(description="its standard output and error, as one text (the first 1 MiB)")
    truncated: bool = Field(description="whether more output came than is shown")
    timed_out: bool
    seconds: float


class SiteScale(Body):
    what = "scale"
    instances: Annotated[int, Field(ge=1, le=SCALE_MAX)]


class Ftp(Answer):
    host: str
    port: int
    user: str
    password: str | None = Field(None, description="only when just set")


class Deploy(Answer):
    url: str
    git: str | None = Field(None, description="where a git push (to main or master) deploys the site")
    user: str
    password: str | None = Field(None, description="only when just set")


class SiteProblem(Answer):
    worker: str | None = Field(None, description="the worker's host (an admin's view only)")
    kind: Literal["cannot_serve", "placement"] = Field(
        "cannot_serve",
        description="cannot_serve: the site is not served (by that worker); placement: it is served, but not "
        "where its plan says (a reserved plan's site on shared workers)",
    )
    reason: str


class AppState(Answer):
    """The site's app on one worker: its state and the limits it met."""

    worker: str | None = Field(None, description="the worker's host (an admin's view only)")
    state: str
    reason: str | None = Field(None, description="state unknown: why")


class Site(Answer):
    name: str
    url: str
    subscription: int
    tenant: str
    state: Literal["running", "stopped", "suspended"] = Field(
        description="suspended: its subscription is (whatever the site's own state), so it serves nothing"
    )
    instances: int = Field(1, ge=1)
    hostnames: list[str]
    ftp: Ftp
    deploy: Deploy
    problems: list[SiteProblem] = Field([], description="why a worker cannot serve the site (empty: none)")
    apps: list[AppState] | None = Field(
        None, description="site show: the site's app on each worker (none while the site is not running)"
    )
    pending: str | None = Field(
        None,
        description="why it is stored but not live yet: in a change's answer, the controller did not apply "
        "it; in a running site, the controller has not applied its creation or start, so nothing serves it",
    )


class SiteList(Answer):
    sites: list[Site]
    next_cursor: NextCursor = None


class SiteListQuery(ListQuery):
    tenant: str | None = Field(None, max_length=NAME_MAX, description="only this tenant's sites")
    subscription: int | None = Field(None, ge=0, le=ID_MAX, description="only this subscription's sites")
    state: Literal["running", "stopped", "suspended"] | None = None


class Deployed(Answer):
    site: str
    version: int
    files: int | None = None
    bytes: int | None = None
    message: str | None = Field(
        None, description="what to know beyond the numbers: a stopped site builds and serves it once started"
    )


class BackupRestored(Deployed):
    restored: str = Field(description="the scheduled backup now the site's content")


class AppSettings(Answer):
    site: str
    settings: dict[str, str]
    sticky: list[str] = Field([], description="settings that stay with the site's address in slot swaps")


class StickySettings(Body):
    what = "sticky settings"
    sticky: Annotated[
        list[Annotated[str, Field(max_length=200, pattern=ENV_NAME.pattern)]], Field(max_length=100)
    ] = Field(description="app setting names that stay with the site's address when slots are swapped")


class SlotCreate(Body):
    what = "slot"
    slot: Annotated[
        str,
        AfterValidator(validate_slot_name),
        Field(description="e.g. staging: <site>-<slot>", json_schema_extra={"pattern": SLOT_NAME_PATTERN}),
    ]


class SlotCreated(Site):
    slot: str
    production: str


class Slot(Answer):
    slot: str = Field(description="'production' or the slot's name")
    site: str = Field(description="the site whose address this is")
    url: str
    served_by: str = Field(description="the site answering this address (after a swap: the other one)")
    sticky_settings: dict[str, str]


class SlotList(Answer):
    site: str
    slots: list[Slot]
    next_cursor: NextCursor = None


class Swap(Body):
    what = "swap"
    warm_timeout: Annotated[float, Field(ge=1, le=600)] = Field(
        60.0, description="seconds the slot's app has to answer its first request before the swap is refused"
    )


class Swapped(Answer):
    site: str
    slot: str
    production_served_by: str
    slot_served_by: str


class AppSettingsPatch(RootModel[dict[str, Annotated[str, Field(max_length=MAX_VALUE_CHARS)] | None]]):
    """Keys to set (string) or remove (null)."""

    model_config = ConfigDict(strict=True, json_schema_extra={"propertyNames": {"pattern": ENV_NAME.pattern}})
    what: ClassVar[str] = "settings change"

    def fields(self) -> Json:
        return dict(self.root)


class SiteUsage(Answer):
    """The site's usage per UTC day, totals, and today's use against the plan's daily quotas."""

    site: str
    days: list[dict[str, Any]]
    totals: dict[str, Any]


class QuotaLifted(Answer):
    site: str
    quota: dict[str, Any]


class UsageExport(Answer):
    """Every site's usage per day, with tenant, subscription and plan."""

    rows: list[dict[str, Any]]


class UsageQuery(Query):
    from_: dt.date | None = Field(None, alias="from", description="first UTC day (default: 30 days ago)")
    to: dt.date | None = Field(None, description="last UTC day, included (default: today)")


class UsageExportQuery(UsageQuery):
    format: Literal["json", "csv"] | None = None


class LogsQuery(Query):
    follow: Literal["0", "1", "true", "yes"] | None = Field(None, description="1: keep streaming new lines")
    lines: int = Field(100, ge=0, le=10_000, description="how many past lines")


# -- hostnames


class HostnameAdd(Body):
    what = "custom hostname"
    hostname: Hostname
    certificate: str | None = Field(None, description="PEM certificate (chain), leaf first")
    key: str | None = Field(None, description="PEM private key (may be in 'certificate' instead)")
    pfx: str | None = Field(
        None, description="a PFX/PKCS#12 file, base64", json_schema_extra={"contentEncoding": "base64"}
    )
    password: str | None = Field(None, description="for the PFX or an encrypted key")


class DnsRecord(Answer):
    type: Literal["TXT", "CNAME"]
    name: str
    value: str


class CertificateInfo(Answer):
    subject: str
    issuer: str
    names: list[str]
    not_after: str
    fingerprint_sha256: str


class CertificateState(Answer):
    state: CertState = Field(
        description="pending_verification: no certificate before DNS proves the name; issuing: the "
        "controller is ordering one from the ACME CA; valid: served until `until`; failed: the last order "
        "failed (`reason`), tried again at `retry_at`; none: ACME is off and none was uploaded"
    )
    source: Literal["acme", "upload"] | None
    until: str | None
    reason: str | None
    retry_at: str | None


class HostnameInfo(Answer):
    hostname: str
    site: str
    state: HostnameState = Field(description="pending: not served until DNS proves the tenant owns the name")
    verified_at: str | None = None
    checked_at: str | None = None
    problem: str | None = Field(None, description="why the last DNS check did not prove it")
    records: list[DnsRecord] = Field(
        description="for a pending name: the TXT record proves it is yours, the CNAME sends visitors here; create them, then verify"
    )
    certificate_state: CertificateState
    certificate: CertificateInfo | None


class Hostnames(Answer):
    site: str
    verification_id: str
    hostnames: list[HostnameInfo]
    next_cursor: NextCursor = None


class HostnameListQuery(ListQuery):
    state: HostnameState | None = None


class Availability(Answer):
    hostname: str
    available: bool
    reason: str


# -- the fabric: hosts, roles, upgrades


class HostCreate(Body):
    what = "host"
    name: Hostname
    fabric: Literal[FABRICS] = "netns"  # type: ignore[valid-type]


class RoleAdd(Body):
    what = "role"
    role: Literal[KINDS]  # type: ignore[valid-type]
    host: Hostname
    ssh_user: str | None = None
    ssh_key: str | None = Field(None, description="a key file on the controller's machine")
    size: Literal[WORKER_SIZES] | None = None  # type: ignore[valid-type]
    reserved_for: Annotated[int, Field(ge=0, le=ID_MAX)] | None = Field(
        None, description="a subscription id (workers only)"
    )


class RoleActionRequest(Body):
    what = "role action"
    confirm: bool = Field(
        False, description="stop or remove the last running worker or front end, taking every site down"
    )
    forget: bool = Field(
        False,
        description="remove only: when the host cannot be reached (gone for good), delete the role's "
        "record anyway; whatever is left on the host stays there",
    )


class UpgradeRequest(Body):
    what = "upgrade"
    force: bool = False


class HostInfo(Answer):
    name: str
    fabric: str
    address: str
    state: str
    roles: list[str]


class HostList(Answer):
    hosts: list[HostInfo]
    next_cursor: NextCursor = None


class HostListQuery(ListQuery):
    fabric: str | None = Field(None, max_length=32, description="only hosts of this fabric")


class RoleInfo(Answer):
    role: str
    host: str
    state: str
    fabric: str | None = None
    host_state: str | None = None
    reason: str | None = None
    desired_state: str | None = None
    config_version: int | None = None
    desired_version: int | None = None
    code_version: str | None = None
    code_hash: str | None = None
    size: str | None = None
    reserved_for: int | None = None
    last_heartbeat: str | None = None
    load: dict[str, Any] = {}


class RoleList(Answer):
    roles: list[RoleInfo]
    next_cursor: NextCursor = None


class RoleListQuery(ListQuery):
    role: Literal[KINDS] | None = None  # type: ignore[valid-type]
    host: str | None = Field(None, max_length=HOSTNAME_MAX)


class Progress(Answer):
    """One line of a long action's progress (NDJSON), then ``{"result": ...}`` or ``{"error": ...}``."""


# -- turning pydantic's errors into ours


def validated(model: type[M], data: Any) -> M:
    """``data`` as ``model``, or :class:`InvalidInput` saying what is wrong and what is allowed."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _refusal(model, exc) from None


def _refusal(model: type[BaseModel], exc: ValidationError) -> InvalidInput:
    errors = exc.errors(include_url=False)
    what = getattr(model, "what", "request")
    is_query = issubclass(model, Query)
    known = sorted((f.alias or n) for n, f in model.model_fields.items() if n != "root")
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and e["loc"]]
    if unknown:
        if is_query:
            return InvalidInput(
                f"unknown query parameter(s): {', '.join(unknown)}",
                hint=f"allowed: {', '.join(known)}" if known else "this call takes no query parameters",
            )
        return InvalidInput(
            f"unknown field(s) for a {what}: {', '.join(unknown)}", hint=f"known: {', '.join(known)}"
        )
    first = errors[0]
    loc = first["loc"]
    field = ".".join(str(p) for p in loc if not isinstance(p, int)) or what
    if is_query:
        field = f"query parameter {field!r}"
    elif loc:
        field = repr(field)
    if first["type"] == "missing":
        required = [f.alias or n for n, f in model.model_fields.items() if f.is_required()]
        return InvalidInput(f"{field} is required", hint=f"a {what} needs: {', '.join(required)}")
    if first["type"] in ("model_type", "dict_type") and not loc:
        return InvalidInput(f"the request body must be a JSON object for a {what}")
    allowed = _allowed(model, loc)
    if is_query:
        allowed = allowed.removesuffix(" or null")  # a parameter left out is the null
    return InvalidInput(f"{field} {allowed}", hint=f"got {_shown(first.get('input'))}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _allowed(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """What a field takes, in words, from the model's own JSON schema."""
    schema = model.model_json_schema(mode="validation")
    defs = schema.get("$defs", {})
    node: Json = schema
    for part in loc:
        node = _resolve(node, defs)
        if isinstance(part, int):
            node = node.get("items", {})
        elif "properties" in node and part in node["properties"]:
            node = node["properties"][part]
        else:
            node = node.get("additionalProperties") or {}
    return f"must be {_describe(_resolve(node, defs), defs)}"


def _resolve(node: Json, defs: Json) -> Json:
    ref = node.get("$ref")
    return defs.get(str(ref).rsplit("/", 1)[-1], {}) if ref else node


def _describe(node: Json, defs: Json) -> str:
    options = node.get("anyOf")
    if options:
        return " or ".join(_describe(_resolve(o, defs), defs) for o in options)
    if "enum" in node:
        return "one of " + ", ".join(str(v) for v in node["enum"])
    if "const" in node:
        return repr(node["const"])
    kind = node.get("type")
    if kind == "integer":
        low, high = node.get("minimum"), node.get("maximum")
        if low is not None and high is not None:
            return f"an integer from {low} to {high}"
        if low is not None:
            return f"an integer of at least {low}"
        if high is not None:
            return f"an integer of at most {high}"
        return "an integer"
    if kind == "boolean":
        return "true or false"
    if kind == "null":
        return "null"
    if kind == "array":
        return "a list"
    if kind == "object":
        return "a JSON object"
    if kind == "string":
        low, high = node.get("minLength"), node.get("maxLength")
        if node.get("format") == "date":
            return "a date (YYYY-MM-DD)"
        if high is not None:
            return f"a string of {low or 0} to {high} characters"
        return "a string"
    return "valid"
