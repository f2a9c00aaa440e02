"""The admin API's OpenAPI document (bastion/openapi/) against the real thing.

It is valid OpenAPI 3.1; it lists exactly the routes a real app registers under
/admin/v1; real answers of every operation, errors included, match the status, media
type, headers and schema it documents; and schemathesis, driven by the document alone,
finds no 5xx and no answer the document does not allow, against a gateway process of
its own (its random accounts, keys and credits stay out of the other tests' ledger).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import CACHE_SALT_SECRET, GATEWAY_TOML, Gateway, free_port, start, stop
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from bastion.admin import PREFIX, ROUTES
from bastion.app import create_app
from bastion.config import Config
from bastion.openapi import OPERATIONS, admin_document

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "gpt-oss-120b"
DOC = "urn:bastion:admin-openapi"
TOO_BIG = b'{"name": "' + b"x" * 1_100_000 + b'"}'  # over the test config's max_body_bytes


def pointer(*parts: str) -> str:
    """A JSON pointer (RFC 6901) into the document."""
    return "/".join(part.replace("~", "~0").replace("/", "~1") for part in ("", *parts))


class Contract:
    """Checks real answers against the document, and remembers which answers it saw."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.registry = Registry().with_resource(DOC, DRAFT202012.create_resource(doc))
        self.seen: set[tuple[str, str, int]] = set()

    def check(self, response: httpx.Response, path: str) -> httpx.Response:
        """``path``: the documented path (``/admin/v1/keys/{id}``) the request went to."""
        method = response.request.method.lower()
        where = f"{method.upper()} {path} -> {response.status_code}: {response.text[:300]}"
        operation = self.doc["paths"][path][method]
        status = str(response.status_code)
        assert status in operation["responses"], f"undocumented status: {where}"
        documented = operation["responses"][status]
        media = response.headers.get("content-type", "").split(";")[0]
        assert media in documented["content"], f"undocumented {media!r}: {where}"
        for name, header in documented["headers"].items():
            header = self.resolve(header)
            if name not in response.headers:
                assert not header.get("required"), f"no {name} header: {where}"
                continue
            self.validator(header["schema"]).validate(response.headers[name])
        if media == "application/json":
            ref = pointer("paths", path, method, "responses", status, "content", media, "schema")
            self.validator({"$ref": DOC + "#" + ref}).validate(response.json())
        self.seen.add((method.upper(), path, response.status_code))
        return response

    def resolve(self, item: dict[str, Any]) -> dict[str, Any]:
        if "$ref" not in item:
            return item
        found: Any = self.doc
        for part in item["$ref"].removeprefix("#/").split("/"):
            found = found[part]
        return found

    def validator(self, schema: dict[str, Any]) -> Draft202012Validator:
        return Draft202012Validator(
            schema, registry=self.registry, format_checker=Draft202012Validator.FORMAT_CHECKER
        )

    def missing(self, paths: tuple[str, ...], skip: tuple[int, ...] = (401, 500)) -> set[Any]:
        """Documented (method, path, status) of ``paths`` that no checked answer had."""
        documented = {
            (method.upper(), path, int(status))
            for path in paths
            for method, operation in self.doc["paths"][path].items()
            for status in operation["responses"]
            if int(status) not in skip
        }
        return documented - self.seen


def documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


def new_name() -> str:
    return "oa-" + uuid.uuid4().hex[:10]


def eventually(check: Callable[[], Any], seconds: float = 5.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not (found := check()):
        assert time.monotonic() < deadline, f"nothing within {seconds}s"
        time.sleep(0.05)
    return found


@pytest.fixture(scope="module")
def api(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.root, headers=AUTH, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def contract(api: httpx.Client) -> Contract:
    return Contract(api.get(f"{PREFIX}/openapi.json").raise_for_status().json())


# ---- the document itself ---------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1(api: httpx.Client, contract: Contract) -> None:
    served = contract.check(api.get(f"{PREFIX}/openapi.json"), f"{PREFIX}/openapi.json")
    assert served.headers["content-type"].startswith("application/json")
    doc = served.json()
    assert doc["openapi"] == "3.1.0"
    OpenAPIV31SpecValidator(doc).validate()  # raises on the first error
    assert doc["components"]["securitySchemes"]["adminToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["adminToken"]["description"],
    }
    credit = doc["paths"][f"{PREFIX}/accounts/{{name}}/credit"]["post"]
    assert "Idempotency-Key" in [p["name"] for p in credit["parameters"] if p["in"] == "header"]
    usage = doc["paths"][f"{PREFIX}/usage"]["get"]["responses"]["200"]["content"]
    assert set(usage) == {"application/json", "text/csv"}
    models = doc["components"]["schemas"]["KeyCreate"]["properties"]["models"]
    assert MODEL in models["anyOf"][0]["items"]["enum"]  # the gateway's own catalogue


async def test_the_document_lists_every_admin_route_and_no_other(tmp_path: Path) -> None:
    """Both ways: a route added to the router without a document entry fails here, and
    so does an entry left behind for a route that no longer exists."""
    config = Config(database_url=f"sqlite:///{tmp_path / 'bastion.db'}", admin_token=TOKEN)
    app = create_app(config)
    registered = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith(PREFIX + "/")
    }
    async with TestClient(TestServer(app)) as client:
        response = await client.get(f"{PREFIX}/openapi.json", headers=AUTH)
        assert response.status == 200
        doc = await response.json()
    assert registered == documented_routes(doc)
    assert set(OPERATIONS) == {(method, path) for method, path, _, _ in ROUTES}
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)) == len(ROUTES)


def test_a_route_without_an_entry_is_left_out_so_the_comparison_fails() -> None:
    extra = ("GET", "/brand-new", "brand_new", 200)
    doc = admin_document((*ROUTES, extra), PREFIX, ())
    assert ("GET", PREFIX + "/brand-new") not in documented_routes(doc)
    assert len(documented_routes(doc)) == len(ROUTES)


async def test_no_admin_token_no_document(tmp_path: Path) -> None:
    config = Config(database_url=f"sqlite:///{tmp_path / 'bastion.db'}")
    async with TestClient(TestServer(create_app(config))) as client:
        for headers in ({}, AUTH):
            response = await client.get(f"{PREFIX}/openapi.json", headers=headers)
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"


# ---- real answers against the document ---------------------------------------------------

ACCOUNTS = tuple(PREFIX + p for p in ("/accounts", "/accounts/{name}", "/accounts/{name}/credit"))
KEYS = tuple(PREFIX + p for p in ("/keys", "/keys/{id}", "/keys/{id}/revoke"))
REPORTS = tuple(PREFIX + p for p in ("/usage", "/refusals", "/audit", "/openapi.json"))


def test_account_answers_are_as_documented(api: httpx.Client, contract: Contract) -> None:
    check, name, ghost = contract.check, new_name(), new_name()
    collection, one, credit = ACCOUNTS
    assert check(api.post(collection, json={"name": name, "credit": "5"}), collection).is_success
    check(api.post(collection, json={"name": name}), collection)  # 409 taken
    check(api.post(collection, json={"nme": name}), collection)  # 400
    check(api.post(collection, content=TOO_BIG), collection)  # 413
    check(api.get(collection), collection)
    check(api.get(collection, params={"x": "1"}), collection)  # 400
    check(api.get(f"{collection}/{name}"), one)
    check(api.get(f"{collection}/{ghost}"), one)  # 404
    check(api.get(f"{collection}/a%00"), one)  # 400
    check(api.patch(f"{collection}/{name}", json={"alert_below": "1.00"}), one)
    check(api.patch(f"{collection}/{name}", json={}), one)  # 400
    check(api.patch(f"{collection}/{ghost}", json={"alert_below": None}), one)  # 404
    check(api.patch(f"{collection}/{name}", content=TOO_BIG), one)  # 413
    url, key = f"{collection}/{name}/credit", {"Idempotency-Key": uuid.uuid4().hex}
    first = check(api.post(url, json={"amount": "2.50"}, headers=key), credit)
    replay = check(api.post(url, json={"amount": "2.50"}, headers=key), credit)
    assert replay.json() == first.json() and replay.headers["idempotent-replayed"] == "true"
    check(api.post(url, json={"amount": "3"}, headers=key), credit)  # 409 key reused
    check(api.post(url, json={"amount": "-100"}), credit)  # 409 insufficient balance
    check(api.post(url, json={"amount": 1}), credit)  # 400
    check(api.post(f"{collection}/{ghost}/credit", json={"amount": "1"}), credit)  # 404
    check(api.post(url, content=TOO_BIG), credit)  # 413
    assert not contract.missing(ACCOUNTS)


def test_key_answers_are_as_documented(api: httpx.Client, contract: Contract) -> None:
    check, name, ghost = contract.check, new_name(), "key_" + uuid.uuid4().hex[:12]
    collection, one, revoke = KEYS
    check(api.post(f"{PREFIX}/accounts", json={"name": name}), ACCOUNTS[0])
    controls = {"limit": "1", "limit_reset": "daily", "models": [MODEL], "expires_at": "2999-01-01"}
    made = check(api.post(collection, json={"account": name, **controls}), collection).json()
    check(api.post(collection, json={"account": new_name()}), collection)  # 404
    check(api.post(collection, json={"account": name, "rpm": -1}), collection)  # 400
    check(api.post(collection, content=TOO_BIG), collection)  # 413
    check(api.get(collection), collection)
    check(api.get(collection, params={"account": name}), collection)
    check(api.get(collection, params={"account": new_name()}), collection)  # 404
    check(api.get(collection, params={"acount": name}), collection)  # 400
    check(api.patch(f"{collection}/{made['id']}", json={"rpm": 5, "limit": None}), one)
    check(api.patch(f"{collection}/{made['id']}", json={}), one)  # 400
    check(api.patch(f"{collection}/{ghost}", json={"rpm": 5}), one)  # 404
    check(api.patch(f"{collection}/{made['id']}", content=TOO_BIG), one)  # 413
    check(api.post(f"{collection}/{made['id']}/revoke"), revoke)
    check(api.post(f"{collection}/{ghost}/revoke"), revoke)  # 404
    check(api.post(f"{collection}/key_%00/revoke"), revoke)  # 400
    check(api.delete(f"{collection}/{made['id']}"), one)
    check(api.delete(f"{collection}/{ghost}"), one)  # 404
    check(api.delete(f"{collection}/key_%00"), one)  # 400
    assert not contract.missing(KEYS)


def test_report_answers_are_as_documented(
    gateway: Gateway, api: httpx.Client, contract: Contract
) -> None:
    """With a ledger row and refusals (an unknown key, and a revoked one) to report."""
    check, name = contract.check, new_name()
    usage, refusals, audit, document = REPORTS
    check(api.post(f"{PREFIX}/accounts", json={"name": name, "credit": "1"}), ACCOUNTS[0])
    made = check(api.post(KEYS[0], json={"account": name}), KEYS[0]).json()
    gateway.wait_for_key(made["key"])
    client = openai.OpenAI(base_url=gateway.url, api_key=made["key"], max_retries=0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    check(api.post(f"{KEYS[0]}/{made['id']}/revoke"), KEYS[2])
    gateway.wait_for_key(made["key"], present=False)
    eventually(lambda: api.get(usage, params={"account": name}).json())
    eventually(lambda: api.get(refusals, params={"account": name}).json())
    assert len(check(api.get(usage, params={"account": name}), usage).json()) == 1
    check(api.get(usage, params={"key": made["id"], "since": "2000-01-01"}), usage)
    totals = {"group_by": "day,model,key,account", "until": "2999-01-01T00:00:00+01:00"}
    assert check(api.get(usage, params=totals), usage).json()
    csv = check(api.get(usage, params={"account": name, "format": "csv"}), usage)
    assert csv.text.startswith("request_id,account,")
    check(api.get(usage, params={"group_by": "week"}), usage)  # 400
    check(api.get(usage, params={"account": new_name()}), usage)  # 404
    assert check(api.get(refusals), refusals).json()
    check(api.get(refusals, params={"account": name, "since": "2000-01-01"}), refusals)
    check(api.get(refusals, params={"since": "yesterday"}), refusals)  # 400
    check(api.get(refusals, params={"account": new_name()}), refusals)  # 404
    check(api.get(audit), audit)
    assert check(api.get(audit, params={"account": name}), audit).json()["ok"] is True
    check(api.get(audit, params={"acount": name}), audit)  # 400
    check(api.get(audit, params={"account": new_name()}), audit)  # 404
    check(api.get(document), document)
    assert not contract.missing(REPORTS)


def test_every_operation_without_the_token_is_a_documented_401(
    gateway: Gateway, contract: Contract
) -> None:
    for path, item in contract.doc["paths"].items():
        url = gateway.root + path.format(name="acme", id="key_0")
        for method in item:
            response = contract.check(httpx.request(method, url, json={}), path)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"


async def test_a_failing_store_is_a_documented_500(tmp_path: Path) -> None:
    """A real SQLite store whose tables were renamed under the running gateway."""
    db = tmp_path / "bastion.db"
    config = Config(database_url=f"sqlite:///{db}", admin_token=TOKEN)
    async with TestClient(TestServer(create_app(config))) as client:
        served = await client.get(f"{PREFIX}/openapi.json", headers=AUTH)
        contract = Contract(await served.json())
        with sqlite3.connect(db) as conn:
            conn.execute("ALTER TABLE accounts RENAME TO accounts_gone")
        try:
            for method, path in (("GET", "/accounts"), ("POST", "/keys")):
                body = {"account": "a"} if method == "POST" else None
                response = await client.request(method, PREFIX + path, json=body, headers=AUTH)
                real = httpx.Response(
                    response.status,
                    headers=dict(response.headers),
                    content=await response.read(),
                    request=httpx.Request(method, str(response.url)),
                )
                assert contract.check(real, PREFIX + path).status_code == 500
                assert real.json()["error"]["code"] == "internal_error"
        finally:
            with sqlite3.connect(db) as conn:
                conn.execute("ALTER TABLE accounts_gone RENAME TO accounts")


# ---- schemathesis, against a gateway of its own ------------------------------------------

ST_TOKEN = "schemathesis-admin-token"
CHECKS = ",".join(
    ("not_a_server_error", "status_code_conformance", "content_type_conformance",
     "response_schema_conformance")
)  # fmt: skip


@pytest.fixture(scope="module")
def own_gateway(tmp_path_factory: pytest.TempPathFactory, sim_port: int) -> Iterator[str]:
    """A gateway on a SQLite file of its own (root URL), as conftest starts the shared one."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    port = free_port()
    config = tmp / "bastion.toml"
    config.write_text(
        GATEWAY_TOML.format(
            port=port,
            db=tmp / "bastion.db",
            sim=sim_port,
            slow=sim_port,
            dead=free_port(),
            faults="",
            salt_secret=CACHE_SALT_SECRET,
        )
    )
    env = {**os.environ, "BASTION_ADMIN_TOKEN": ST_TOKEN}
    proc = start(["serve", "--config", str(config)], f"http://127.0.0.1:{port}/healthz", env=env)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    own_gateway: str, tmp_path: Path
) -> None:
    """Every phase (examples, coverage, fuzzing, stateful), deterministic, 15 examples per
    operation. An existing account and key are offered as path, query and body values so
    that most requests get past 404 into the handlers' real work."""
    auth = {"Authorization": f"Bearer {ST_TOKEN}"}
    with httpx.Client(base_url=own_gateway + PREFIX, headers=auth) as admin:
        name = admin.post("/accounts", json={"name": "st-acme", "credit": "100"}).json()["name"]
        key = admin.post("/keys", json={"account": name}).json()
    bearer = {"Authorization": f"Bearer {key['key']}"}
    eventually(lambda: httpx.get(f"{own_gateway}/v1/models", headers=bearer).is_success)
    chat = openai.OpenAI(base_url=own_gateway + "/v1", api_key=key["key"], max_retries=0)
    chat.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    settings = tmp_path / "schemathesis.toml"
    settings.write_text(
        f"""
[dictionaries.accounts]
values = ["{name}"]
[dictionaries.keys]
values = ["{key["id"]}"]
[parameters]
"path.name" = {{ dictionary = "accounts", probability = 0.7 }}
"path.id" = {{ dictionary = "keys", probability = 0.7 }}
"body.account" = {{ dictionary = "accounts", probability = 0.7 }}
"query.account" = {{ dictionary = "accounts", probability = 0.5 }}
"query.key" = {{ dictionary = "keys", probability = 0.5 }}
"""
    )
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(settings), "--no-color",
        "run", f"{own_gateway}{PREFIX}/openapi.json", "--url", own_gateway,
        "--header", f"Authorization: {auth['Authorization']}", "--checks", CHECKS,
        "--max-examples", "15", "--generation-deterministic",
        "--workers", "1",  # 2 threads: "AST constructor recursion depth mismatch" on 3.11.7
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert "No module named schemathesis" not in run.stderr, (
        "schemathesis is missing: install the test extra (make test, or pip install -e '.[test]')"
    )
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    # every operation but the document's own, which schemathesis leaves out
    assert f"Tested: {len(ROUTES) - 1}" in run.stdout, run.stdout[-3000:]
