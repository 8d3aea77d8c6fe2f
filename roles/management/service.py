"""The management service: what admins and tenants may do, shared by the REST API and the portals.

DB work runs in a thread (sync SQLAlchemy sessions); after each committed change the controller is
nudged. Every method takes the calling :class:`Principal` and enforces its rights.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import Any

from roles.management._nudge import Nudger
from roles.management._store import Principal, Store
from roles.management.config import ManagementConfig
from shared.db import Database
from shared.errors import Unauthorized, Unavailable
from shared.internal import InternalClient
from shared.logs import get_logger

__all__ = ["ManagementService", "Principal"]

Json = dict[str, Any]

# A web deploy may carry a large zip over a slow link; the publisher answers once it is committed.
_DEPLOY_TIMEOUT = 3600.0


class ManagementService:
    def __init__(self, config: ManagementConfig, db: Database) -> None:
        self.config = config
        self._log = get_logger(config.role, host=config.host)
        self._store = Store(db, config)
        self._client = InternalClient(config, timeout=10)
        self._deploy_client = InternalClient(config, timeout=_DEPLOY_TIMEOUT)
        self._nudger = Nudger(self._client, config.controller_url, self._log)

    async def start(self) -> None:
        self._nudger.start()

    async def close(self) -> None:
        await self._nudger.stop()
        await self._client.close()
        await self._deploy_client.close()

    async def _write(self, fn: Any, *args: Any) -> Any:
        result = await asyncio.to_thread(fn, *args)
        self._nudger.nudge()
        return result

    # -- auth

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization: Bearer <token>`` header."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "an API token is required (Authorization: Bearer <token>)",
                hint="pass --token or set SITECLOUD_TOKEN",
            )
        principal: Principal = await asyncio.to_thread(self._store.authenticate, token.strip())
        return principal

    # -- plans, tenants, subscriptions

    async def create_plan(self, who: Principal, body: Json) -> Json:
        result: Json = await self._write(self._store.create_plan, who, body)
        self._log.info("plan %s created", result["name"])
        return result

    async def list_plans(self, who: Principal) -> Json:
        return await asyncio.to_thread(self._store.list_plans, who)

    async def create_tenant(self, who: Principal, body: Json) -> Json:
        result: Json = await self._write(self._store.create_tenant, who, body)
        self._log.bind(tenant=result["name"]).info("tenant created")
        return result

    async def list_tenants(self, who: Principal) -> Json:
        return await asyncio.to_thread(self._store.list_tenants, who)

    async def create_subscription(self, who: Principal, body: Json) -> Json:
        result: Json = await self._write(self._store.create_subscription, who, body)
        self._log.bind(tenant=result["tenant"]).info(
            "subscription %s to plan %s", result["id"], result["plan"]
        )
        return result

    async def list_subscriptions(self, who: Principal) -> Json:
        return await asyncio.to_thread(self._store.list_subscriptions, who)

    # -- sites

    async def create_site(self, who: Principal, body: Json) -> Json:
        result: Json = await self._write(self._store.create_site, who, body)
        self._log.bind(tenant=result["tenant"], site=result["name"]).info("site created")
        return result

    async def list_sites(self, who: Principal) -> Json:
        return await asyncio.to_thread(self._store.list_sites, who)

    async def show_site(self, who: Principal, name: str) -> Json:
        return await asyncio.to_thread(self._store.show_site, who, name)

    async def delete_site(self, who: Principal, name: str) -> None:
        await self._write(self._store.delete_site, who, name)
        self._log.bind(tenant=who.tenant, site=name).info("site deleted")

    async def deploy(self, who: Principal, name: str, body: AsyncIterable[bytes]) -> Json:
        """Stream a zip to the publisher, which replaces the site's content with it in one version."""
        await asyncio.to_thread(self._store.check_site, who, name)
        if not self.config.publisher_url:
            raise Unavailable("web deploy is not available: no publisher is configured")
        url = f"{self.config.publisher_url.rstrip('/')}/v1/deploy/{name}"
        answer = await self._deploy_client.request_json(
            "POST", url, data=body, headers={"Content-Type": "application/zip"}
        )
        if not isinstance(answer, dict):
            raise Unavailable("the publisher gave an unexpected answer to the deploy")
        self._log.bind(site=name).info("deployed version %s", answer.get("version"))
        return answer

    # -- roles

    async def list_roles(self, who: Principal) -> Json:
        return await asyncio.to_thread(self._store.list_roles, who)
