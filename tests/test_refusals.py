"""Refused requests are visible per account and key: in /metrics at once, in the store soon.

An operator whose customer says "my requests fail" looks here: how many 401s (a revoked
key), 402s (no credit) and 429s (rate limits) each key of each account got, and when
the last one was. Refusals by Bastion write no ledger row, so without this they leave
no trace an operator can read.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

BODY = {"model": "gpt-oss-120b", "input": "hello", "max_output_tokens": 16}


def post(gateway, key: str, body: dict = BODY) -> httpx.Response:
    return httpx.post(
        gateway.url + "/responses", json=body, headers={"Authorization": f"Bearer {key}"}
    )


def refusal_samples(gateway) -> dict[tuple[str, str, str, str], float]:
    """bastion_refusals_total samples: (account, key, status, code) -> count."""
    text = httpx.get(gateway.root + "/metrics").text
    found = {}
    for labels, value in re.findall(r"^bastion_refusals_total\{(.*)\} (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        found[got["account"], got["key"], got["status"], got["code"]] = float(value)
    return found


def key_id(gateway, account: str) -> str:
    [key] = gateway.store_call("list_keys", account)
    return key.id


def stored_refusals(gateway, account: str, want: int, timeout: float = 10.0) -> list:
    """The store's per-key counts for ``account`` once they add up to ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        rows = gateway.store_call("refusals", account)
        if sum(r.count for r in rows) >= want or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_402_and_429_are_counted_per_account_and_key(gateway):
    key, account = gateway.new_key(credit="0.000001", rpm=1)
    kid = key_id(gateway, account)
    assert post(gateway, key).status_code == 402
    assert post(gateway, key).status_code == 429  # the 402 used the one request per minute
    samples = refusal_samples(gateway)
    assert samples[account, kid, "402", "insufficient_funds"] == 1
    assert samples[account, kid, "429", "rate_limit_exceeded"] == 1
    rows = stored_refusals(gateway, account, 2)
    assert {(r.key_id, r.status, r.code, r.count) for r in rows} == {
        (kid, 402, "insufficient_funds", 1),
        (kid, 429, "rate_limit_exceeded", 1),
    }
    assert all(r.last_at > 0 for r in rows)


def test_a_revoked_key_is_told_so_and_counted_against_its_account(gateway):
    key, account = gateway.new_key()
    kid = key_id(gateway, account)
    gateway.store_call("revoke_key", kid)
    gateway.wait_for_key(key, present=False)
    refused = post(gateway, key)
    assert refused.status_code == 401
    assert "revoked" in refused.json()["error"]["message"]
    assert refusal_samples(gateway)[account, kid, "401", "invalid_api_key"] >= 1
    [row] = stored_refusals(gateway, account, 1)
    assert (row.key_id, row.status) == (kid, 401)


def test_an_unknown_key_is_counted_without_an_account(gateway):
    before = refusal_samples(gateway).get(("", "", "401", "invalid_api_key"), 0)
    assert post(gateway, "qbt_" + "u" * 43).status_code == 401
    assert "revoked" not in post(gateway, "qbt_" + "u" * 43).json()["error"]["message"]
    assert refusal_samples(gateway)[("", "", "401", "invalid_api_key")] == before + 2


def test_served_requests_and_bad_bodies_are_not_refusals(gateway):
    key, account = gateway.new_key()
    assert post(gateway, key).status_code == 200
    assert post(gateway, key, {"model": "gpt-oss-120b"}).status_code == 400
    assert not [k for k in refusal_samples(gateway) if k[0] == account]


def test_the_admin_api_lists_refusals_per_account_and_key(gateway):
    key, account = gateway.new_key(credit="0.000001")
    kid = key_id(gateway, account)
    assert post(gateway, key).status_code == 402
    stored_refusals(gateway, account, 1)
    admin = {"Authorization": "Bearer test-admin-token"}
    url = gateway.root + "/admin/v1/refusals"
    [row] = httpx.get(url, params={"account": account}, headers=admin).json()
    assert row["account"] == account and row["key_id"] == kid
    assert (row["status"], row["code"], row["count"]) == (402, "insufficient_funds", 1)
    assert row["last_at"].endswith("Z")
    later = httpx.get(url, params={"account": account, "since": "2999-01-01"}, headers=admin)
    assert later.json() == []
    bad = httpx.get(url, params={"since": "yesterday"}, headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
    unknown = httpx.get(url, params={"account": "nobody-here"}, headers=admin)
    assert unknown.status_code == 404


async def test_counts_wait_for_a_store_that_is_away(tmp_path):
    """A flush that fails keeps its counts for the next one: none lost, none twice."""
    from bastion.refusals import RefusalCounter
    from bastion.store import StoreError, open_store

    home = tmp_path / "not-yet"
    store = open_store(f"sqlite:///{home}/bastion.db")  # its directory does not exist yet
    counter = RefusalCounter(store, interval_s=60)
    counter.count(401, "invalid_api_key")
    counter.count(401, "invalid_api_key")
    with pytest.raises(StoreError):
        await counter.flush()
    counter.count(401, "invalid_api_key")
    home.mkdir()
    await counter.flush()
    await counter.flush()  # nothing pending: writes nothing
    [row] = await store.refusals()
    assert (row.status, row.count) == (401, 3)
    await store.close()


def bastion(gateway, *args: str) -> subprocess.CompletedProcess:
    """The real ``bastion`` command, on the gateway's config (hence its database)."""
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args, "--config", str(gateway.config_path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip


def test_the_cli_shows_who_is_being_refused(gateway):
    key, account = gateway.new_key(credit="0.000001", rpm=1)
    kid = key_id(gateway, account)
    assert post(gateway, key).status_code == 402
    assert post(gateway, key).status_code == 429
    stored_refusals(gateway, account, 2)
    done = bastion(gateway, "refusals", "--account", account, "--json")
    assert done.returncode == 0, done.stderr
    assert {(r["key_id"], r["status"], r["count"]) for r in json.loads(done.stdout)} == {
        (kid, 402, 1),
        (kid, 429, 1),
    }
    table = bastion(gateway, "refusals", "--account", account)
    assert table.returncode == 0, table.stderr
    [line] = [x for x in table.stdout.splitlines() if x.startswith(account)]
    assert kid[:12] in line and len(line) <= 80
    assert line.split()[2:6] == ["-", "1", "-", "1"]  # 401, 402, 403, 429
    assert "2 refused requests, 1 key" in table.stdout
    unknown = bastion(gateway, "refusals", "--account", "nobody-at-all")
    assert unknown.returncode == 1 and "nobody-at-all" in unknown.stderr
