"""The OpenAPI document at /openapi.json: generated for every route with an operationId, its 4xx answers
documented, and schemathesis finds no 5xx and no answer the document does not describe."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from roles.management._fabric_api import fabric_operations
from roles.management.api import api_routes
from roles.management.api import operations as api_operations
from tests.support import call
from tests.test_management_api import ManagementCloud, start_management


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagementCloud]:
    yield from start_management(tmp_path_factory.mktemp("openapi"))


@pytest.fixture(scope="module")
def document(cloud: ManagementCloud) -> dict[str, Any]:
    status, doc = call(f"https://localhost:{cloud.config.api_port}/openapi.json", cloud.pki.client_ssl(None))
    assert status == 200
    return dict(doc)


def test_every_route_is_documented_and_nothing_else(document: dict[str, Any]) -> None:
    routes = {
        (r.method.lower(), re.sub(r"\{(\w+):(?:[^{}]|\{[^{}]*\})*\}", r"{\1}", r.path))  # type: ignore[attr-defined]
        for r in api_routes()
    }
    documented = {
        (method, path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert documented == routes


def test_operations_have_schemas_and_error_responses(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.")
    schemas = document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            responses = op["responses"]
            ok = [code for code in responses if code.startswith("2")]
            assert len(ok) == 1, (method, path)
            if ok[0] != "204":
                assert responses[ok[0]]["content"], (method, path)
            if op.get("security") != []:
                assert "401" in responses, (method, path)
            for code, answer in responses.items():
                if code.startswith("4") or code.startswith("5"):
                    assert answer["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }
            if method in ("post", "patch") and "requestBody" in op:
                assert "400" in responses, (method, path)
            for ref in re.findall(r"#/components/schemas/(\w+)", str(op)):
                assert ref in schemas, ref


def test_every_operation_has_a_unique_operation_id(document: dict[str, Any]) -> None:
    ids = [
        op.get("operationId")
        for item in document["paths"].values()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]
    assert all(isinstance(i, str) and re.fullmatch(r"[a-z][a-z_]*", i) for i in ids), ids
    assert len(set(ids)) == len(ids) == len(api_routes())


def test_list_operations_document_paging(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    lists = 0
    for path, item in document["paths"].items():
        op = item.get("get")
        if not op or not op["operationId"].startswith("list_"):
            continue
        lists += 1
        names = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
        assert {"limit", "cursor"} <= names, path
        answer = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        assert "next_cursor" in schemas[answer]["properties"], path
    assert lists >= 9


def _probe(cloud: ManagementCloud, method: str, path: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, _ = call(
        f"https://localhost:{cloud.config.api_port}{path}",
        cloud.pki.client_ssl(None),
        method=method,
        headers=headers,
    )
    return status


def test_the_4xx_each_operation_answers_are_documented(
    cloud: ManagementCloud, document: dict[str, Any]
) -> None:
    """Without a token, with an unknown query parameter, and naming something that is not there: each
    operation answers a 4xx that its own entry in the document lists."""
    fabric = {op.doc_path for op in fabric_operations()}
    for op in api_operations():
        documented = set(document["paths"][op.doc_path][op.method.lower()]["responses"])
        # Path parameters filled with things that do not exist (and are valid names).
        path = re.sub(r"\{(id|version)\}", "999999", op.doc_path)
        path = path.replace("{hostname}", "nothing.example.com").replace("{role}", "worker")
        path = path.replace("{host}", "nothing.example.com").replace("{action}", "restart")
        path = path.replace("{name}", "nothing-here").replace("{username}", "nobody")
        path = path.replace("{slot}", "staging").replace("{backup}", "20260101T000000Z-v1.zip")
        if not op.public:
            assert _probe(cloud, op.method, path, None) == 401, path
            assert "401" in documented, path
        status = _probe(cloud, op.method, f"{path}?no_such_parameter=1", cloud.admin)
        assert status == 400 and "400" in documented, (op.method, path, status)
        # (A free host name's availability is a 200; the fabric's calls need the controller.)
        if (
            op.params
            and op.body is None
            and op.doc_path not in fabric
            and op.operation_id != "hostname_availability"
        ):
            status = _probe(cloud, op.method, path, cloud.admin)
            assert status == 404 and "404" in documented, (op.method, path, status)


def _unavailable(response: Any) -> bool:
    try:
        return bool(response.status_code == 503 and response.json()["error"]["code"] == "unavailable")
    except (ValueError, KeyError, TypeError):
        return False


def test_schemathesis_finds_no_server_errors(cloud: ManagementCloud, document: dict[str, Any]) -> None:
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
    requests = pytest.importorskip("requests")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    # A token of its own, so that a generated DELETE /tokens/{id} cannot revoke the fixture's.
    user = cloud.ok("POST", "/users", body={"username": "fuzz-admin"})
    token = cloud.ok(
        "POST",
        "/auth/token",
        token=None,
        body={"username": "fuzz-admin", "password": user["password"], "name": "fuzz"},
    )["token"]
    # Deploy bodies are zips: fuzzed bytes are fine (the publisher is not running; unknown sites 404).
    schemathesis.serializer.alias("application/zip", "application/octet-stream")
    schema = schemathesis.openapi.from_dict(document)
    base_url = f"https://localhost:{cloud.config.api_port}"
    session = requests.Session()
    session.verify = str(cloud.pki.ca_file)
    operations = [result.ok() for result in schema.get_all_operations()]
    # Revoking tokens last: the run's own token may be among the ids tried.
    operations.sort(key=lambda op: op.path.startswith("/api/v1/tokens/"))
    failures: list[str] = []
    calls: list[int] = []
    started = time.monotonic()
    try:
        for op in operations:

            @settings(
                max_examples=4,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy())
            def run(case: Any) -> None:
                response = case.call(
                    base_url=base_url,
                    session=session,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=10,
                    verify=str(cloud.pki.ca_file),
                )
                calls.append(response.status_code)
                # 503 "unavailable" is an honest answer when a role the call needs is not running
                # (no controller or publisher in this test); anything else 5xx is a bug.
                if response.status_code >= 500 and not _unavailable(response):
                    failures.append(
                        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
                    )
                # Every status and answer is one the document describes, the fabric's calls included.
                case.validate_response(
                    response, checks=[status_code_conformance, response_schema_conformance]
                )

            try:
                run()
            except Exception as exc:
                failures.append(f"{op.method.upper()} {op.path}: {exc!s:.1500}")
    finally:
        session.close()
    assert not failures, "\n\n".join(failures)
    # Every operation was called, with more than one example each, and some calls got through.
    assert len(calls) >= 2 * len(operations) and any(200 <= c < 300 for c in calls)
    assert time.monotonic() - started < 60
    # The API is still up and answering after the run.
    assert cloud.call("GET", "/health", token=None)[0] == 200
