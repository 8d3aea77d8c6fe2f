"""The content API on the fileserver's control port (mTLS): its messages are the types of
:mod:`shared.contracts.content`; see docs/architecture.md, "Fileserver content API"."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from aiohttp import web

from roles.fileserver._zip import stream_zip
from roles.fileserver.feed import MAX_WAIT
from roles.fileserver.store import ContentStore
from shared.config import ROLE_KINDS
from shared.contracts.content import BlobFetch, CommitRequest, RollbackRequest, encode_blob_batch
from shared.errors import BadRequest, InvalidInput, QuotaExceeded
from shared.internal import json_error, require_role

__all__ = ["content_routes"]

# Workers pull content, the publisher reads what it is about to change; only the publisher writes.
_READERS = ("worker", "publisher")
_WRITERS = ("publisher",)
# A file is sent in reads this big (TLS rules out sendfile): fewer trips through the thread pool.
_SEND_CHUNK = 1024 * 1024


async def _body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The body's bytes as they were parsed: no slicing to a fixed size, no joining (both copies)."""
    async for data, _ in request.content.iter_chunks():
        if data:
            yield data


def _number(request: web.Request, key: str, default: float) -> float:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {key!r} must be a number, not {raw!r}") from None


def _integer(request: web.Request, key: str) -> int | None:
    raw = request.query.get(key)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidInput(f"query parameter {key!r} must be a whole number >= 0, not {raw!r}")
    return int(raw)


def _uid(request: web.Request) -> str | None:
    """The content id the caller means by the site's name: with it, a call is refused (503) while the
    name is another site's here, so nothing is read from or written to the wrong site's content."""
    return request.query.get("uid")


async def _json_body(request: web.Request) -> object:
    try:
        body: object = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    return body


def content_routes(store: ContentStore) -> list[web.RouteDef]:
    async def site_info(request: web.Request) -> web.Response:
        require_role(request, *ROLE_KINDS)
        return web.json_response(store.info(request.match_info["site"], _uid(request)).to_json())

    async def manifest(request: web.Request) -> web.Response:
        require_role(request, *_READERS)
        body = await store.manifest_bytes(
            request.match_info["site"], _integer(request, "version"), _uid(request)
        )
        return web.Response(body=body, content_type="application/json")

    async def blob(request: web.Request) -> web.FileResponse:
        require_role(request, *_READERS)
        path = await store.blob_path(request.match_info["site"], request.match_info["sha"], _uid(request))
        return web.FileResponse(
            path, chunk_size=_SEND_CHUNK, headers={"Content-Type": "application/octet-stream"}
        )

    async def file(request: web.Request) -> web.StreamResponse:
        require_role(request, *_READERS)
        site, rel = request.match_info["site"], request.match_info["path"]
        data = await store.file_bytes(site, rel, _uid(request))
        if data is not None:
            return web.Response(body=data, content_type="application/octet-stream")
        path = await store.file_path(site, rel, _uid(request))
        return web.FileResponse(
            path, chunk_size=_SEND_CHUNK, headers={"Content-Type": "application/octet-stream"}
        )

    async def upload(request: web.Request) -> web.Response:
        require_role(request, *_WRITERS)
        try:
            answer = await store.upload_blob(
                request.match_info["site"],
                _body_chunks(request),
                request.content_length,
                _uid(request),
            )
        except QuotaExceeded as err:
            # The rest of the body is not wanted: answer now and drop the connection.
            response = json_error(err)
            response.force_close()
            return response
        return web.json_response(answer.to_json())

    async def fetch_batch(request: web.Request) -> web.Response:
        require_role(request, *_READERS)
        wanted = BlobFetch.parse(await _json_body(request), what="blob fetch")
        blobs = await store.read_blobs(request.match_info["site"], wanted.sha256, _uid(request))
        payload = b"".join(len(b).to_bytes(8, "big") + b for b in blobs)
        return web.Response(body=payload, content_type="application/octet-stream")

    async def upload_batch(request: web.Request) -> web.Response:
        require_role(request, *_WRITERS)
        try:
            answer = await store.upload_blobs(
                request.match_info["site"], _body_chunks(request), _uid(request)
            )
        except QuotaExceeded as err:
            response = json_error(err)
            response.force_close()
            return response
        return web.Response(body=encode_blob_batch(answer), content_type="application/json")

    async def put_file(request: web.Request) -> web.Response:
        require_role(request, *_WRITERS)
        site, since = request.match_info["site"], _integer(request, "since")
        try:
            answer = await store.put_file(
                site,
                request.match_info["path"],
                _body_chunks(request),
                request.content_length,
                _uid(request),
            )
        except QuotaExceeded as err:
            response = json_error(err)
            response.force_close()
            return response
        body = await store.put_answer(site, answer, since, _uid(request))
        return web.Response(body=body, content_type="application/json")

    async def diff(request: web.Request) -> web.Response:
        require_role(request, *_READERS)
        since = _integer(request, "since") or 0
        body = await store.diff(
            request.match_info["site"],
            since,
            _integer(request, "version"),
            _integer(request, "limit"),
            _uid(request),
        )
        return web.Response(body=body, content_type="application/json")

    async def site_versions(request: web.Request) -> web.Response:
        require_role(request, *_READERS, "management")
        return web.json_response(store.version_list(request.match_info["site"], _uid(request)).to_json())

    async def site_zip(request: web.Request) -> web.StreamResponse:
        # Management streams it on to the tenant (a download, a backup).
        require_role(request, *_READERS, "management")
        name = request.match_info["site"]
        version, members = await store.zip_members(name, _integer(request, "version"), _uid(request))
        resp = web.StreamResponse(
            headers={
                "Content-Type": "application/zip",
                "Content-Disposition": f'attachment; filename="{name}-v{version}.zip"',
                "X-Sitecloud-Version": str(version),
            }
        )
        await resp.prepare(request)
        async for chunk in stream_zip(members):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def rollback(request: web.Request) -> web.Response:
        # A rollback writes no new content: the tenant asks for it through the management API.
        require_role(request, *_WRITERS, "management")
        body = await _json_body(request) if request.can_read_body else {}
        wanted = RollbackRequest.parse(body, what="rollback")
        answer = await store.rollback(
            request.match_info["site"], wanted.version, if_newest=wanted.if_newest, uid=_uid(request)
        )
        return web.json_response(answer.to_json())

    async def commit(request: web.Request) -> web.Response:
        require_role(request, *_WRITERS)
        # Decoded and checked by pydantic straight from the bytes: a deploy's commit holds an op per file.
        wanted = CommitRequest.parse_json(await request.read(), what="commit")
        answer = await store.commit(
            request.match_info["site"],
            wanted.ops,
            replace=wanted.replace,
            source=wanted.source,
            uid=_uid(request),
        )
        return web.json_response(answer.to_json())

    async def changes(request: web.Request) -> web.Response:
        require_role(request, *_READERS)
        since = _integer(request, "since") or 0
        wait = max(0.0, min(_number(request, "wait", 0.0), MAX_WAIT))
        return web.json_response((await store.feed.wait(since, wait)).to_json())

    async def versions(request: web.Request) -> web.Response:
        # Management pins each site's version when it takes a backup.
        require_role(request, *_READERS, "management")
        return web.json_response(store.versions().to_json())

    return [
        web.get("/v1/sites/{site}", site_info),
        web.get("/v1/sites/{site}/manifest", manifest),
        web.get("/v1/sites/{site}/blobs/{sha}", blob),
        web.get("/v1/sites/{site}/files/{path:.+}", file),
        web.put("/v1/sites/{site}/files/{path:.+}", put_file),
        web.get("/v1/sites/{site}/diff", diff),
        web.get("/v1/sites/{site}/versions", site_versions),
        web.get("/v1/sites/{site}/zip", site_zip),
        web.post("/v1/sites/{site}/rollback", rollback),
        web.post("/v1/sites/{site}/blobs", upload),
        web.post("/v1/sites/{site}/blob-batch", upload_batch),
        web.post("/v1/sites/{site}/blob-fetch", fetch_batch),
        web.post("/v1/sites/{site}/commit", commit),
        web.get("/v1/changes", changes),
        web.get("/v1/versions", versions),
    ]
