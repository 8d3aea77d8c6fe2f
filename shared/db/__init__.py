"""The runtime DB: models, sessions and migrations. Only controller and management use it."""

from shared.db.models import (
    ApiToken,
    Base,
    CloudState,
    CustomHostname,
    Host,
    Plan,
    PortalSession,
    PublishingCredential,
    Role,
    Setting,
    Site,
    SiteAssignment,
    Subscription,
    Tenant,
    User,
)
from shared.db.session import Database, bump_generation, current_generation

__all__ = [
    "ApiToken",
    "Base",
    "CloudState",
    "CustomHostname",
    "Database",
    "Host",
    "Plan",
    "PortalSession",
    "PublishingCredential",
    "Role",
    "Setting",
    "Site",
    "SiteAssignment",
    "Subscription",
    "Tenant",
    "User",
    "bump_generation",
    "current_generation",
]
