"""The publisher's fileserver client when there is no fileserver to talk to: none running (an empty
URL from the snapshot) or one that does not answer (nothing listens on its port). Either way a
request is :class:`StorageUnavailable` (FTP 451, HTTP 503), never another exception, and the tenant's
message names no internal address."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import pytest

from roles.publisher._fileserver import FileserverClient
from shared.errors import StorageUnavailable
from shared.net import free_port


@dataclass(frozen=True)
class _Site:
    name: str
    content_id: str


BLOG = _Site("blog", "b10b")


def test_no_fileserver_running_is_storage_unavailable() -> None:
    with (
        FileserverClient("", ssl.create_default_context()) as client,
        pytest.raises(StorageUnavailable) as caught,
    ):
        client.site_info(BLOG)
    assert caught.value.ftp_code == 451 and caught.value.status == 503
    assert str(caught.value) == "storage is unavailable, try again later (no fileserver is running)"


def test_a_fileserver_that_does_not_answer_is_storage_unavailable() -> None:
    url = f"https://127.0.0.1:{free_port('127.0.0.1')}"
    with FileserverClient(url, ssl.create_default_context(), timeout=5) as client:
        for _ in range(2):  # the first request, and one on the client after a failure
            with pytest.raises(StorageUnavailable) as caught:
                client.site_info(BLOG)
            assert "127.0.0.1" not in str(caught.value)
            # The cause, for the publisher's log, says where it was looked for.
            assert url in str(caught.value.__cause__)
