"""``bastion audit``: clean books pass; books broken behind the store's back are reported.

On both backends (a SQLite temp file and a fresh PostgreSQL database): ``run_audit``
itself, the real ``bastion audit`` command in a subprocess (its exit status and JSON),
and ``GET /admin/v1/audit`` on an aiohttp test server over the same store.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bastion.admin import add_admin_routes
from bastion.audit import problem_count, run_audit
from bastion.store import Account, LedgerRow, NotFound, Store
from bastion.store.sqlite import sqlite_path

USD = 1_000_000_000
TOKEN = "audit-admin-token"


async def execute(url: str, sql: str) -> None:
    """One statement straight on the database, behind the store's back."""
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(sqlite_path(url))
        try:
            with conn:
                conn.execute(sql)
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(url)
    try:
        await pg.execute(sql)
    finally:
        await pg.close()


def row(request_id: str, account: Account, key_id: str, cost: int, **kw: Any) -> LedgerRow:
    values: dict[str, Any] = {
        "request_id": request_id,
        "account_id": account.id,
        "key_id": key_id,
        "model": "gpt-oss-120b",
        "endpoint": "responses",
        "input_tokens": 10,
        "output_tokens": 20,
        "cost": cost,
        "estimated": False,
        "status": "200",
        "created_at": time.time_ns() // 1000,
    }
    values.update(kw)
    return LedgerRow(**values)


async def books(store: Store) -> tuple[Account, Account]:
    """Two accounts with grants, a take-back, spending (one row estimated) and a live lease."""
    acme = await store.create_account("acme", 10 * USD)
    beta = await store.create_account("beta", 3 * USD)
    await store.credit_account("acme", 2 * USD)
    await store.credit_account("acme", -USD // 2)
    key, _ = await store.create_key("acme")
    written = await store.write_ledger(
        [
            row("r1", acme, key.id, 1_250_000_000, cached_input_tokens=4, reasoning_tokens=7),
            row("r2", acme, key.id, 1, estimated=True),
        ]
    )
    assert [r.request_id for r in written] == ["r1", "r2"]
    await store.heartbeat("gw-live")
    await store.lease("gw-live", beta.id, USD)
    return acme, beta


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in report["accounts"]}


# ---- run_audit --------------------------------------------------------------------------


async def test_clean_books_pass(store: Store) -> None:
    acme, _ = await books(store)
    report = await run_audit(store)
    assert report["ok"] is True and problem_count(report) == 0
    assert (report["problems"], report["uncharged"], report["dead_letters"]) == ([], "0.00", 0)
    accounts = by_name(report)
    assert list(accounts) == ["acme", "beta"]
    assert accounts["acme"] == {
        "name": "acme",
        "id": acme.id,
        "balance": "10.249999999",
        "expected_balance": "10.249999999",
        "credits": "11.50",
        "spent": "1.250000001",
        "uncharged": "0.00",
        "rows": 2,
        "estimated_rows": 1,
        "leased": "0.00",
        "stale_leases": "0.00",
        "dead_letters": 0,
        "problems": [],
    }
    assert (accounts["beta"]["balance"], accounts["beta"]["leased"]) == ("3.00", "1.00")
    assert accounts["beta"]["rows"] == 0 and accounts["beta"]["problems"] == []

    only = await run_audit(store, "beta")
    assert only["ok"] is True and [a["name"] for a in only["accounts"]] == ["beta"]
    assert only["accounts"][0] == accounts["beta"]


async def test_an_empty_database_passes(store: Store) -> None:
    assert await run_audit(store) == {
        "ok": True,
        "problems": [],
        "uncharged": "0.00",
        "dead_letters": 0,
        "accounts": [],
    }


async def test_unknown_account_is_not_found(store: Store) -> None:
    await books(store)
    with pytest.raises(NotFound, match="no account named 'ghost'"):
        await run_audit(store, "ghost")


async def test_uncharged_money_is_reported_not_a_problem(store: Store) -> None:
    """A cost above the balance is served money not collected: visible, explained, ok."""
    acme, _ = await books(store)
    key, _ = await store.create_key("acme")
    [written] = await store.write_ledger([row("big", acme, key.id, 12 * USD)])
    assert written.uncharged == 12 * USD - 10_249_999_999
    report = await run_audit(store)
    assert report["ok"] is True, report
    a = by_name(report)["acme"]
    assert (a["balance"], a["expected_balance"], a["problems"]) == ("0.00", "0.00", [])
    assert a["uncharged"] == "1.750000001" and report["uncharged"] == "1.750000001"
    assert (a["spent"], a["rows"]) == ("11.50", 3)


async def test_stale_leases_are_reported_not_a_problem(store: Store, db_url: str) -> None:
    """A silent gateway's lease no longer counts and is reclaimed at the next heartbeat."""
    acme, _ = await books(store)
    await execute(db_url, "INSERT INTO gateways (id, seen_at) VALUES ('gw-gone', 1)")
    await execute(
        db_url,
        "INSERT INTO leases (gateway_id, account_id, amount)"
        f" VALUES ('gw-gone', '{acme.id}', {100 * USD})",
    )
    report = await run_audit(store)
    assert report["ok"] is True, report
    a = by_name(report)["acme"]
    assert (a["stale_leases"], a["leased"]) == ("100.00", "0.00")


async def _broken(store: Store, db_url: str, sql: str) -> tuple[dict[str, Any], list[str]]:
    """Break acme's books with ``sql``; the audit must fail on acme alone."""
    await books(store)
    assert (await run_audit(store))["ok"] is True
    await execute(db_url, sql)
    report = await run_audit(store)
    assert report["ok"] is False
    accounts = by_name(report)
    assert accounts["beta"]["problems"] == []
    only = await run_audit(store, "acme")
    assert only["ok"] is False and only["accounts"] == [accounts["acme"]]
    beta_only = await run_audit(store, "beta")
    assert beta_only["ok"] is True
    return accounts["acme"], accounts["acme"]["problems"]


async def test_balance_changed_by_hand(store: Store, db_url: str) -> None:
    sql = "UPDATE accounts SET balance = balance + 1 WHERE name = 'acme'"
    a, problems = await _broken(store, db_url, sql)
    assert (a["balance"], a["expected_balance"]) == ("10.25", "10.249999999")
    [problem] = problems
    assert "0.000000001 USD too much" in problem and "bastion usage --account acme" in problem


async def test_balance_below_zero(store: Store, db_url: str) -> None:
    sql = f"UPDATE accounts SET balance = -{USD} WHERE name = 'acme'"
    a, problems = await _broken(store, db_url, sql)
    assert a["balance"] == "-1.00"
    assert len(problems) == 3
    assert "11.249999999 USD too little" in problems[0]
    assert "below zero (-1.00 USD)" in problems[1]
    assert "0.00 USD of leases, more than the balance of -1.00 USD" in problems[2]


async def test_spent_changed_by_hand(store: Store, db_url: str) -> None:
    _, problems = await _broken(store, db_url, "UPDATE accounts SET spent = 0 WHERE name = 'acme'")
    [problem] = problems
    assert "spent is 0.00 USD but the ledger collected 1.250000001 USD" in problem


async def test_uncharged_column_wrong(store: Store, db_url: str) -> None:
    sql = "UPDATE accounts SET uncharged = 5 WHERE name = 'acme'"
    a, problems = await _broken(store, db_url, sql)
    assert a["uncharged"] == "0.000000005"
    [problem] = problems
    assert "uncharged is 0.000000005 USD but the ledger's rows add up to 0.00 USD" in problem


async def test_ledger_row_edited(store: Store, db_url: str) -> None:
    """A cost changed in the ledger: the balance and spent no longer follow from the rows."""
    a, problems = await _broken(
        store, db_url, "UPDATE ledger SET cost = cost + 100 WHERE request_id = 'r1'"
    )
    assert a["expected_balance"] == "10.249999899"
    assert len(problems) == 2
    assert "0.0000001 USD too much" in problems[0] and "spent is" in problems[1]


async def test_lease_larger_than_the_balance(store: Store, db_url: str) -> None:
    await store.heartbeat("gw-rogue")
    sql = (
        "INSERT INTO leases (gateway_id, account_id, amount) SELECT 'gw-rogue', id, balance + 1"
        " FROM accounts WHERE name = 'acme'"
    )
    a, problems = await _broken(store, db_url, sql)
    assert a["leased"] == "10.25"
    [problem] = problems
    assert "hold 10.25 USD of leases, more than the balance of 10.249999999 USD" in problem


async def test_dead_letter_is_a_problem(store: Store) -> None:
    acme, _ = await books(store)
    key, _ = await store.create_key("acme")
    lost = row("req_lost", acme, key.id, 1, output_tokens=10**19)
    await store.dead_letter(lost, "ledger row req_lost: out of range")
    report = await run_audit(store)
    assert report["ok"] is False and report["dead_letters"] == 1
    a = by_name(report)["acme"]
    assert a["dead_letters"] == 1
    [problem] = a["problems"]
    assert "req_lost" in problem and "out of range" in problem and "dead_letters" in problem
    assert by_name(report)["beta"]["problems"] == []
    assert (await run_audit(store, "beta"))["ok"] is True


async def test_dead_letter_of_an_unknown_account(store: Store) -> None:
    """A row for an account that does not exist belongs to no account: a top-level problem."""
    await books(store)
    ghost = Account("acct_000000000000", "ghost", 0, 0, 0, 0)
    await store.dead_letter(row("req_orphan", ghost, "key_x", 5), "no such account")
    report = await run_audit(store)
    assert report["ok"] is False and report["dead_letters"] == 1
    [problem] = report["problems"]
    assert "req_orphan" in problem and "acct_000000000000" in problem
    assert problem_count(report) == 1
    assert all(a["problems"] == [] for a in report["accounts"])
    assert (await run_audit(store, "acme"))["ok"] is True  # not acme's


# ---- the CLI ----------------------------------------------------------------------------


def bastion(tmp_path: Path, db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "audit.toml"
    config.write_text(f'[database]\nurl = "{db_url}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["COLUMNS"] = "250"
    return subprocess.run(
        [sys.executable, "-m", "bastion", "audit", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
    )


async def test_cli_exit_status(store: Store, db_url: str, tmp_path: Path) -> None:
    await books(store)
    clean = bastion(tmp_path, db_url, "--json")
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout) == await run_audit(store)
    human = bastion(tmp_path, db_url)
    assert human.returncode == 0, human.stderr
    assert "acme" in human.stdout and "$10.249999999" in human.stdout
    assert human.stdout.rstrip().endswith("ok")

    await execute(db_url, "UPDATE accounts SET balance = balance + 1 WHERE name = 'acme'")
    await execute(db_url, "UPDATE accounts SET uncharged = 7 WHERE name = 'beta'")
    broken = bastion(tmp_path, db_url, "--json")
    assert broken.returncode == 1, broken.stderr
    report = json.loads(broken.stdout)
    assert report == await run_audit(store) and report["ok"] is False
    human = bastion(tmp_path, db_url)
    assert human.returncode == 1
    assert "too much" in human.stdout and "uncharged is 0.000000007 USD" in human.stdout
    assert human.stdout.rstrip().endswith("2 problems")

    only = bastion(tmp_path, db_url, "--account", "acme", "--json")
    assert only.returncode == 1 and [a["name"] for a in json.loads(only.stdout)["accounts"]] == [
        "acme"
    ]
    ghost = bastion(tmp_path, db_url, "--account", "ghost", "--json")
    assert ghost.returncode == 1 and ghost.stdout == ""
    assert ghost.stderr.strip() == "error: no account named 'ghost'"


# ---- the admin API ----------------------------------------------------------------------


async def test_admin_endpoint(store: Store, db_url: str) -> None:
    await books(store)
    gateway = SimpleNamespace(store=store, config=SimpleNamespace(admin_token=TOKEN))
    app = web.Application()
    add_admin_routes(app, gateway)  # type: ignore[arg-type]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/admin/v1/audit", headers=auth)
        assert response.status == 200
        assert await response.json() == await run_audit(store)

        await execute(db_url, "UPDATE accounts SET spent = spent + 1 WHERE name = 'beta'")
        response = await client.get("/admin/v1/audit", headers=auth)
        assert response.status == 200  # the report is the answer; its "ok" says how it went
        report = await response.json()
        assert report["ok"] is False and by_name(report)["beta"]["problems"]

        response = await client.get("/admin/v1/audit", params={"account": "acme"}, headers=auth)
        assert response.status == 200
        assert (await response.json())["ok"] is True

        response = await client.get("/admin/v1/audit", params={"account": "ghost"}, headers=auth)
        assert response.status == 404
        error = (await response.json())["error"]
        assert (error["code"], error["param"]) == ("not_found", "account")
        assert "ghost" in error["message"]

        response = await client.get("/admin/v1/audit", params={"acount": "acme"}, headers=auth)
        assert response.status == 400
        response = await client.get("/admin/v1/audit")
        assert response.status == 401
