"""The runtime DB: models, sessions and migrations. Only controller and management use it."""

from shared.db.models import (
    ApiToken,
    Base,
    CloudState,
    Host,
    Plan,
    PublishingCredential,
    Role,
    Site,
    SiteAssignment,
    Subscription,
    Tenant,
)
from shared.db.session import Database, bump_generation, current_generation

__all__ = [
    "ApiToken",
    "Base",
    "CloudState",
    "Database",
    "Host",
    "Plan",
    "PublishingCredential",
    "Role",
    "Site",
    "SiteAssignment",
    "Subscription",
    "Tenant",
    "bump_generation",
    "current_generation",
]
