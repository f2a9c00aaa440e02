"""The real ``bastion`` command in a subprocess, against a temp config and SQLite file."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bastion import cli
from bastion.auth import hash_key, well_formed
from bastion.cli.usage import parse_time
from bastion.money import parse_usd
from bastion.store import LedgerRow
from bastion.store.sqlite import SQLiteStore
from bastion.views import iso_time


class Env:
    """A temp config + database, and a way to run the CLI against them."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.db = tmp / "x.db"
        self.url = f"sqlite:///{self.db}"  # absolute path: sqlite:////tmp/…/x.db
        self.config = tmp / "b.toml"
        self.config.write_text(
            f'[database]\nurl = "{self.url}"\n\n[ratelimit]\ndefault_rpm = 77\ndefault_tpm = 9999\n'
        )

    def run(
        self,
        *args: str,
        config: bool = True,
        env: dict[str, str] | None = None,
        columns: int = 250,
    ) -> Any:
        argv = [sys.executable, "-m", "bastion", *args]
        if config:
            argv += ["--config", str(self.config)]
        base = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        base["COLUMNS"] = str(columns)  # rich's width when stdout is not a terminal
        return subprocess.run(
            argv, capture_output=True, text=True, cwd=self.dir, env={**base, **(env or {})}
        )

    def ok(self, *args: str) -> Any:
        """Run, require exit 0, and parse stdout as JSON when --json was given."""
        proc = self.run(*args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout) if "--json" in args else proc.stdout

    def fails(self, *args: str, message: str) -> str:
        """Run, require exit 1 with one clear line on stderr and no traceback."""
        proc = self.run(*args)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert message in lines[0], lines[0]
        assert proc.stdout == ""
        return lines[0]

    def store_call(self, fn_name: str, *args: Any) -> Any:
        async def go() -> Any:
            store = SQLiteStore(self.url)
            try:
                return await getattr(store, fn_name)(*args)
            finally:
                await store.close()

        return asyncio.run(go())


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def us(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp()) * 1_000_000


# ---- accounts -------------------------------------------------------------------------


def test_accounts_create_show_list(env: Env) -> None:
    created = env.ok("accounts", "create", "acme", "--credit", "10", "--json")
    assert set(created) == {"id", "name", "balance"}
    assert created["id"].startswith("acct_")
    assert (created["name"], created["balance"]) == ("acme", "10.00")

    plain = env.ok("accounts", "create", "beta", "--json")
    assert plain["balance"] == "0.00"

    shown = env.ok("accounts", "show", "acme", "--json")
    assert shown == {
        "id": created["id"],
        "name": "acme",
        "balance": "10.00",
        "reserved": "0.00",
        "spent": "0.00",
        "uncharged": "0.00",
        "alert_below": None,
    }
    listed = env.ok("accounts", "list", "--json")
    assert [a["name"] for a in listed] == ["acme", "beta"]
    assert listed[0] == shown

    human = env.ok("accounts", "list")
    assert "acme" in human and "$10.00" in human
    assert created["id"][:12] in human and created["id"] not in human  # short ids, as git
    assert created["id"] in env.ok("accounts", "list", "--wide")
    human = env.ok("accounts", "create", "gamma", "--credit", "0.5")
    assert "Created account gamma" in human and "$0.50" in human


def test_options_before_arguments_too(env: Env) -> None:
    env.ok("accounts", "create", "acme")
    proc = env.run("accounts", "show", "--json", "acme")
    assert proc.returncode == 0 and json.loads(proc.stdout)["name"] == "acme"


def test_accounts_create_refusals(env: Env) -> None:
    env.ok("accounts", "create", "acme", "--credit", "1")
    env.fails("accounts", "create", "acme", message="already exists")
    env.fails("accounts", "create", "x", "--credit", "1.0000000001", message="9 decimal places")
    env.fails("accounts", "create", "y", "--credit", "ten", message="not a decimal amount")
    env.fails("accounts", "create", "z", "--credit", "-1", message="negative")
    assert [a["name"] for a in env.ok("accounts", "list", "--json")] == ["acme"]


def test_accounts_credit_both_negative_forms(env: Env) -> None:
    env.ok("accounts", "create", "acme", "--credit", "2")
    up = env.ok("accounts", "credit", "acme", "1.25", "--json")
    assert up["balance"] == "3.25" and set(up) == {
        "id", "name", "balance", "reserved", "spent", "uncharged", "alert_below"
    }  # fmt: skip
    down = env.ok("accounts", "credit", "acme", "-0.50", "--json")
    assert down["balance"] == "2.75"
    # after "--", with options before it and after it
    proc = env.run("accounts", "credit", "--json", "acme", "--", "-0.25")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["balance"] == "2.50"
    after = env.ok("accounts", "credit", "acme", "--", "-0.000000001", "--json")
    assert after["balance"] == "2.499999999"
    human = env.ok("accounts", "credit", "acme", "-0.499999999")
    assert "Took back $0.499999999" in human and "$2.00" in human


def test_accounts_credit_refusals_change_nothing(env: Env) -> None:
    env.ok("accounts", "create", "acme", "--credit", "1")
    env.fails("accounts", "credit", "acme", "-1.01", message="balance is 1.00 USD")
    env.fails("accounts", "credit", "acme", "--", "-5", message="balance is 1.00 USD")
    env.fails("accounts", "credit", "acme", "0.0000000001", message="9 decimal places")
    env.fails("accounts", "credit", "acme", "1,5", message="not a decimal amount")
    env.fails("accounts", "credit", "acme", "nan", message="not a finite amount")
    env.fails("accounts", "credit", "acme", "0", message="zero")
    env.fails("accounts", "credit", "ghost", "1", message="no account named 'ghost'")
    env.fails("accounts", "show", "ghost", message="no account named 'ghost'")
    assert env.ok("accounts", "show", "acme", "--json")["balance"] == "1.00"
    with closing(sqlite3.connect(env.db)) as conn:  # only the initial grant was recorded
        assert conn.execute("SELECT amount FROM credits").fetchall() == [(1_000_000_000,)]


def test_accounts_credit_with_an_idempotency_key_applies_once(env: Env) -> None:
    """A retried top-up (the first one timed out, say) prints the first answer again."""
    env.ok("accounts", "create", "acme")
    args = ("accounts", "credit", "acme", "10", "--idempotency-key", "order-7", "--json")
    first, again = env.run(*args), env.run(*args)
    assert first.returncode == again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == json.loads(first.stdout)
    assert json.loads(first.stdout)["balance"] == "10.00" and first.stderr == ""
    assert again.stderr == (
        "note: idempotency key 'order-7' was used before for this same top-up:"
        " nothing was added; this is its first answer\n"
    )

    take = ("accounts", "credit", "acme", "--idempotency-key", "order-8", "--", "-0.50")
    human = env.ok(*take)
    assert "Took back $0.50" in human and "$9.50" in human
    assert env.ok(*take) == human

    env.fails(*args[:3], "11", *args[4:], message="'order-7' was already used for another top-up")
    env.fails(*args[:3], "1", "--idempotency-key", "", message="1 to 255 printable characters")
    assert env.ok("accounts", "show", "acme", "--json")["balance"] == "9.50"


def test_accounts_show_reserved_and_spent(env: Env) -> None:
    acct = env.ok("accounts", "create", "acme", "--credit", "5", "--json")
    key = env.ok("keys", "create", "--account", "acme", "--json")
    env.store_call("lease", "gw-test", acct["id"], 250_000_000)
    env.store_call(
        "write_ledger",
        [LedgerRow("r1", acct["id"], key["id"], "m", "chat", 1, 2, 1_500_000_000, False, "200", 1)],
    )
    shown = env.ok("accounts", "show", "acme", "--json")
    assert (shown["balance"], shown["reserved"], shown["spent"]) == ("3.50", "0.25", "1.50")
    assert shown["uncharged"] == "0.00"


def test_accounts_update_sets_and_clears_the_balance_alert(env: Env) -> None:
    env.ok("accounts", "create", "acme", "--credit", "10")
    assert env.ok("accounts", "show", "acme", "--json")["alert_below"] is None
    updated = env.ok("accounts", "update", "acme", "--alert-below", "5", "--json")
    assert (updated["alert_below"], updated["balance"]) == ("5.00", "10.00")
    assert env.ok("accounts", "show", "acme", "--json") == updated
    human = env.ok("accounts", "update", "acme", "--alert-below", "2.5")
    assert "acme: balance alert below $2.50 (balance $10.00)" in human
    wide = env.ok("accounts", "list", "--wide")
    assert "alert below" in wide and "$2.50" in wide
    assert "alert" not in env.ok("accounts", "list")  # the narrow table stays 80 columns
    cleared = env.ok("accounts", "update", "acme", "--alert-below", "none", "--json")
    assert cleared["alert_below"] is None
    assert "balance alert off" in env.ok("accounts", "update", "acme", "--alert-below", "None")


def test_accounts_update_refusals_change_nothing(env: Env) -> None:
    env.ok("accounts", "create", "acme", "--credit", "10")
    env.ok("accounts", "update", "acme", "--alert-below", "1")
    env.fails("accounts", "update", "acme", message="nothing to change: give --alert-below")
    env.fails("accounts", "update", "acme", "--alert-below", "0", message="positive")
    env.fails("accounts", "update", "acme", "--alert-below", "1.5e", message="not a decimal")
    env.fails("accounts", "update", "ghost", "--alert-below", "1", message="no account named")
    assert env.ok("accounts", "show", "acme", "--json")["alert_below"] == "1.00"


# ---- keys -----------------------------------------------------------------------------


def test_keys_create_list_update_revoke(env: Env) -> None:
    env.ok("accounts", "create", "acme")
    made = env.ok("keys", "create", "--account", "acme", "--name", "ci", "--rpm", "5", "--json")
    assert set(made) == {
        "id", "key", "account", "name", "rpm", "tpm", "limit", "limit_reset", "expires_at",
        "models",
    }  # fmt: skip
    assert made["id"].startswith("key_") and well_formed(made["key"])
    # rpm: the override; tpm: the config file's default, not the built-in one
    assert (made["account"], made["name"], made["rpm"], made["tpm"]) == ("acme", "ci", 5, 9999)
    default = env.ok("keys", "create", "--json", "--account", "acme")
    assert (default["rpm"], default["tpm"], default["name"]) == (77, 9999, "")

    snapshot = env.store_call("snapshot")
    assert snapshot.keys[hash_key(made["key"])].id == made["id"]

    listed = env.ok("keys", "list", "--json")
    assert [k["id"] for k in listed] == [made["id"], default["id"]]
    first = listed[0]
    assert first["prefix"] == made["key"][:12]
    assert (first["rpm"], first["tpm"], first["revoked"]) == (5, 9999, False)
    assert (first["rpm_default"], first["tpm_default"]) == (False, True)
    assert made["key"] not in json.dumps(listed)
    human = env.ok("keys", "list", "--account", "acme")
    assert made["id"][:12] in human and made["key"] not in human and "active" in human
    assert made["key"][:12] not in human  # the prefix is for --wide
    wide = env.ok("keys", "list", "--wide")
    assert made["id"] in wide and made["key"][:12] in wide and made["key"] not in wide

    updated = env.ok("keys", "update", made["id"], "--tpm", "0", "--json")
    assert (updated["rpm"], updated["tpm"], updated["tpm_default"]) == (5, 0, False)
    updated = env.ok("keys", "update", made["id"][:12], "--rpm", "9", "--json")  # a short id
    assert (updated["id"], updated["rpm"], updated["tpm"]) == (made["id"], 9, 0)
    assert "unlimited" in env.ok("keys", "list")

    revoked = env.ok("keys", "revoke", made["id"], "--json")
    assert revoked["revoked"] is True and revoked["id"] == made["id"]
    assert "revoked" in env.ok("keys", "list")
    snapshot = env.store_call("snapshot")  # revoked keys stay, so gateways can say "revoked"
    assert snapshot.keys[hash_key(made["key"])].revoked
    assert not snapshot.keys[hash_key(default["key"])].revoked


def test_keys_refusals(env: Env) -> None:
    env.ok("accounts", "create", "acme")
    env.fails("keys", "create", "--account", "ghost", message="no account named 'ghost'")
    env.fails("keys", "create", "--account", "acme", "--rpm", "-1", message="rpm")
    env.fails("keys", "list", "--account", "ghost", message="no account named")
    env.fails("keys", "update", "key_000000000000", "--rpm", "1", message="no key with id")
    env.fails("keys", "update", "key_000000000000", message="nothing to change")
    env.fails("keys", "revoke", "key_000000000000", message="no key with id")
    assert env.ok("keys", "list", "--json") == []


def test_keys_spend_limit_expiry_and_models(env: Env) -> None:
    env.ok("accounts", "create", "acme")
    made = env.ok(
        "keys", "create", "--account", "acme", "--limit", "5", "--limit-reset", "daily",
        "--expires", "2100-01-01T00:00:00Z", "--models", "gpt-oss-120b, Qwen3-32B", "--json",
    )  # fmt: skip
    assert (made["limit"], made["limit_reset"]) == ("5.00", "daily")
    assert made["expires_at"] == "2100-01-01T00:00:00.000000Z"
    assert made["models"] == ["Qwen3-32B", "gpt-oss-120b"]
    [stored] = env.store_call("list_keys")
    assert (stored.spend_limit, stored.limit_reset) == (5_000_000_000, "daily")
    assert stored.models == frozenset({"gpt-oss-120b", "Qwen3-32B"})

    assert "$5.00/day" in env.ok("keys", "list")
    wide = env.ok("keys", "list", "--wide")
    assert all(w in wide for w in ("$5.00 per day", "2100-01-01T00:00:00", "Qwen3-32B"))

    weekly = env.ok("keys", "update", made["id"], "--limit-reset", "weekly", "--json")
    assert (weekly["limit"], weekly["limit_reset"]) == ("5.00", "weekly")  # only the period
    cleared = env.ok(
        "keys", "update", made["id"], "--limit", "none", "--expires", "none", "--models", "all",
        "--json",
    )  # fmt: skip
    assert (cleared["limit"], cleared["expires_at"], cleared["models"]) == (None, None, None)
    assert cleared["limit_reset"] == "weekly"

    ended = env.ok("keys", "update", made["id"], "--expires", "2001-01-01", "--json")
    assert ended["expires_at"] == "2001-01-01T00:00:00.000000Z"  # naive: UTC; past: ends it now
    assert "expired" in env.ok("keys", "list")


def test_keys_create_human_shows_the_controls(env: Env) -> None:
    env.ok("accounts", "create", "acme")
    out = env.ok("keys", "create", "--account", "acme", "--limit", "0.25", "--limit-reset",
                 "monthly", "--models", "gpt-oss-120b")  # fmt: skip
    assert "spend limit $0.25 per month" in out and "models gpt-oss-120b" in out


def test_key_controls_refusals(env: Env) -> None:
    env.ok("accounts", "create", "acme")
    create = ("keys", "create", "--account", "acme")
    env.fails(*create, "--models", "gpt-oss-120b,gpt-9", message="--models: unknown model 'gpt-9'")
    env.fails(*create, "--models", ",", message="at least one model")
    env.fails(*create, "--expires", "next week", message="--expires: not an ISO 8601 time")
    env.fails(*create, "--expires", "2001-01-01", message="in the past")
    # year 10000 in UTC: no answer could show it, so it is refused before it is stored
    env.fails(*create, "--expires", "9999-12-31T23:59:59-05:00", message="after 9999-12-31")
    env.fails(*create, "--limit", "-1", message="spend limit must be 0 or positive")
    env.fails(*create, "--limit", "five", message="not a decimal amount: 'five'")
    env.fails(*create, "--limit-reset", "hourly", message="unknown limit reset 'hourly'")
    assert env.ok("keys", "list", "--json") == []
    made = env.ok(*create, "--json")
    env.fails("keys", "update", made["id"], "--models", "nope", message="unknown model 'nope'")
    env.fails("keys", "update", made["id"], message="--limit, --limit-reset, --expires or --models")
    assert env.ok("keys", "list", "--json")[0]["models"] is None


def test_keys_table_with_spend_limits_fits_80_columns(env: Env) -> None:
    env.ok("accounts", "create", "research-lab")
    env.ok("keys", "create", "--account", "research-lab", "--name", "ci-runner-01", "--limit",
           "1234.56", "--limit-reset", "monthly", "--models", "gpt-oss-120b,Qwen3-32B")  # fmt: skip
    env.ok("keys", "create", "--account", "research-lab", "--name", "batch", "--rpm", "0",
           "--tpm", "150000", "--limit", "0.5")  # fmt: skip
    lines = env.run("keys", "list", columns=80).stdout.splitlines()
    assert len(lines) == 4 and all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert all(w in lines[1] for w in ("research-lab", "ci-runner-01", "$1234.56/mo", "active"))
    assert all(w in lines[2] for w in ("batch", "unlimited", "150,000", "$0.50 ", "active"))


def test_keys_create_human_shows_key_once(env: Env) -> None:
    env.ok("accounts", "create", "acme")
    out = env.ok("keys", "create", "--account", "acme")
    key = next(w for w in out.split() if w.startswith("qbt_"))
    assert well_formed(key)
    assert hash_key(key) in env.store_call("snapshot").keys


# ---- usage ----------------------------------------------------------------------------


def _seed_usage(env: Env) -> tuple[dict[str, Any], dict[str, Any]]:
    a = env.ok("accounts", "create", "acme", "--credit", "10", "--json")
    b = env.ok("accounts", "create", "beta", "--credit", "10", "--json")
    ka = env.ok("keys", "create", "--account", "acme", "--json")
    kb = env.ok("keys", "create", "--account", "beta", "--json")
    t = us("2025-01-31T12:00:00+00:00")
    rows = [
        LedgerRow("r-early", a["id"], ka["id"], "gpt-oss-120b", "responses", 10, 20, 1, False,
                  "200", t - 1),
        LedgerRow("r-noon", a["id"], ka["id"], "Qwen3-32B", "chat", 3, 4, 123_456_789, True,
                  "cancelled", t, cached_input_tokens=2, reasoning_tokens=1),
        LedgerRow("r-beta", b["id"], kb["id"], "gpt-oss-20b", "chat", 5, 6, 2_000_000_000, False,
                  "502", t + 1_800_000_000),
    ]  # fmt: skip
    written = env.store_call("write_ledger", rows)
    assert [r.request_id for r in written] == ["r-beta", "r-early", "r-noon"]
    return a, ka


def test_usage_json(env: Env) -> None:
    _, ka = _seed_usage(env)
    rows = env.ok("usage", "--json")
    assert [r["request_id"] for r in rows] == ["r-early", "r-noon", "r-beta"]
    assert rows[1] == {
        "request_id": "r-noon",
        "account": "acme",
        "key_id": ka["id"],
        "model": "Qwen3-32B",
        "endpoint": "chat",
        "input_tokens": 3,
        "cached_input_tokens": 2,
        "output_tokens": 4,
        "reasoning_tokens": 1,
        "cost": "0.123456789",
        "uncharged": "0.00",
        "estimated": True,
        "status": "cancelled",
        "created_at": "2025-01-31T12:00:00.000000Z",
    }
    assert rows[0]["created_at"] == "2025-01-31T11:59:59.999999Z"
    assert rows[0]["cost"] == "0.000000001" and rows[0]["estimated"] is False
    assert rows[2]["account"] == "beta" and rows[2]["status"] == "502"
    assert [r["request_id"] for r in env.ok("usage", "--account", "acme", "--json")] == [
        "r-early",
        "r-noon",
    ]
    assert env.ok("accounts", "show", "acme", "--json")["spent"] == "0.12345679"


def test_usage_since_with_and_without_offset(env: Env) -> None:
    _seed_usage(env)

    def since(value: str, *extra: str) -> list[str]:
        return [r["request_id"] for r in env.ok("usage", "--since", value, *extra, "--json")]

    assert since("2025-01-31T12:00:00") == ["r-noon", "r-beta"]  # no offset: UTC
    assert since("2025-01-31T12:00:00Z") == ["r-noon", "r-beta"]
    assert since("2025-01-31T13:00:00+01:00") == ["r-noon", "r-beta"]
    assert since("2025-01-31T07:00:00.000001-05:00") == ["r-beta"]
    assert since("2025-01-31") == ["r-early", "r-noon", "r-beta"]
    assert since("2025-01-31T12:00:00", "--account", "acme") == ["r-noon"]
    env.fails("usage", "--since", "yesterday", message="not an ISO 8601 time")
    env.fails("usage", "--account", "ghost", message="no account named")


def test_usage_human(env: Env) -> None:
    _seed_usage(env)
    out = env.ok("usage")
    assert "Qwen3-32B" in out and "~$0.123456789" in out and "estimated" in out
    # newest first: r-beta, r-noon, r-early (the narrow table names no request)
    assert out.index("gpt-oss-20b") < out.index("Qwen3-32B") < out.index("gpt-oss-120b")
    assert "r-noon" not in out
    assert "3 requests, $2.12345679" in out
    wide = env.ok("usage", "--wide")
    assert "r-noon" in wide and "2025-01-31T12:00:00.000000Z" in wide


def test_usage_newest_first_limit_and_until(env: Env) -> None:
    _seed_usage(env)

    def ids(*args: str) -> list[str]:
        return [r["request_id"] for r in env.ok("usage", *args, "--json")]

    # --json: the ledger's order (oldest first); every row unless --limit asks for the newest N
    assert ids() == ["r-early", "r-noon", "r-beta"]
    assert ids("--limit", "2") == ["r-noon", "r-beta"]
    assert ids("-n", "0") == ids("--limit", "5") == ["r-early", "r-noon", "r-beta"]
    # --until is exclusive, --since inclusive: consecutive windows never share a row
    assert ids("--until", "2025-01-31T12:00:00Z") == ["r-early"]
    assert ids("--since", "2025-01-31T12:00:00Z", "--until", "2025-01-31T12:30:00Z") == ["r-noon"]
    assert ids("--since", "2025-01-31T12:30:00Z", "--until", "2026-01-01") == ["r-beta"]
    env.fails("usage", "--until", "tomorrow", message="--until: not an ISO 8601 time")

    out = env.ok("usage", "--limit", "2", "--wide")  # the table: newest first
    assert out.index("r-beta") < out.index("r-noon") and "r-early" not in out
    assert "newest 2 of 3 requests: $2.123456789 of $2.12345679 (--limit 0 shows all)" in out
    assert env.run("usage", "--limit", "-1").returncode == 2


def test_usage_by_key_and_as_csv(env: Env) -> None:
    _, ka = _seed_usage(env)

    def ids(*args: str) -> list[str]:
        return [r["request_id"] for r in env.ok("usage", *args, "--json")]

    assert ids("--key", ka["id"]) == ids("--key", ka["id"][:12]) == ["r-early", "r-noon"]
    assert ids("--key", ka["id"], "--since", "2025-01-31T12:00:00Z") == ["r-noon"]
    env.fails("usage", "--key", "key_nope12345", message="no key with id 'key_nope12345'")

    # --csv: the --json fields, in the same order, one line per row under a header
    as_json = env.ok("usage", "--json")
    lines = env.ok("usage", "--csv").splitlines()
    table = list(csv.reader(lines))
    assert table[0] == list(as_json[0])
    assert [dict(zip(table[0], row, strict=True)) for row in table[1:]] == [
        {k: csv_cell(v) for k, v in row.items()} for row in as_json
    ]
    assert lines[2].startswith("r-noon,acme,") and ",0.123456789,0.00,true,cancelled," in lines[2]
    assert env.ok("usage", "--csv", "--since", "2030-01-01").splitlines() == lines[:1]
    env.fails("usage", "--csv", "--json", message="--csv or --json, not both")


def csv_cell(value: object) -> str:
    """A JSON value as the CSV writes it: booleans as JSON spells them."""
    return json.dumps(value) if isinstance(value, bool) else str(value)


def test_usage_group_by_totals_add_up_to_the_ledger(env: Env) -> None:
    a, ka = _seed_usage(env)
    rows = env.ok("usage", "--json")
    money = ("cost", "uncharged")
    counts = ("input_tokens", "cached_input_tokens", "output_tokens")

    def sums(items: list[dict[str, Any]], requests: int | None = None) -> tuple[int, ...]:
        total = [sum(parse_usd(i[f]) for i in items) for f in money]
        total += [sum(i[f] for i in items) for f in counts]
        n = len(items) if requests is None else requests
        return (n, *total)

    for group_by in ("day", "model", "key", "account", "day,model", "account,key,model,day"):
        totals = env.ok("usage", "--group-by", group_by, "--json")
        fields = [{"key": "key_id"}.get(g, g) for g in group_by.split(",")]
        assert all(list(t)[: len(fields)] == fields for t in totals), (group_by, totals)
        assert sums(totals, sum(t["requests"] for t in totals)) == sums(rows), group_by

    by_account = env.ok("usage", "--group-by", "account", "--json")
    assert by_account == [
        {"account": "acme", "requests": 2, "input_tokens": 13, "cached_input_tokens": 2,
         "output_tokens": 24, "cost": "0.12345679", "uncharged": "0.00"},
        {"account": "beta", "requests": 1, "input_tokens": 5, "cached_input_tokens": 0,
         "output_tokens": 6, "cost": "2.00", "uncharged": "0.00"},
    ]  # fmt: skip
    by_day = env.ok("usage", "--group-by", "day,key", "--account", "acme", "--json")
    assert by_day == [dict(day="2025-01-31", key_id=ka["id"], **{
        k: v for k, v in by_account[0].items() if k != "account"})]  # fmt: skip
    until = env.ok("usage", "--group-by", "model", "--until", "2025-01-31T12:00:00Z", "--json")
    assert [(t["model"], t["requests"]) for t in until] == [("gpt-oss-120b", 1)]

    grouped = env.ok("usage", "--group-by", "model,account", "--csv")
    grouped_csv = list(csv.reader(grouped.splitlines()))
    assert grouped_csv[0] == ["model", "account", *list(by_account[0])[1:]]
    assert ["Qwen3-32B", "acme", "1", "3", "2", "4", "0.123456789", "0.00"] in grouped_csv

    human = env.run("usage", "--group-by", "day,model,key,account", columns=80).stdout
    lines = human.splitlines()
    assert all(len(line) <= 80 for line in lines), human
    assert lines[0].split() == ["day", "(UTC)", "model", "key", "account", "requests", "in",
                                "out", "cost"]  # fmt: skip
    assert any(w in lines[1] for w in ("gpt-oss-20b", "Qwen3-32B", "gpt-oss-120b"))
    assert lines[-1] == "3 groups: 3 requests, $2.12345679"
    assert a["name"] in human and ka["id"][:12] in human and ka["id"] not in human
    wide = env.ok("usage", "--group-by", "model", "--wide")
    assert "cached" in wide and "uncharged" in wide

    env.fails("usage", "--group-by", "week", message="--group-by: unknown field 'week'")
    env.fails("usage", "--group-by", "day,day", message="--group-by: 'day' is named twice")
    env.fails("usage", "--group-by", "day", "--limit", "3", message="--limit counts ledger rows")


def test_tables_fit_80_columns(env: Env) -> None:
    """One line per row on an 80-column terminal, for names up to 12 characters."""
    a = env.ok("accounts", "create", "research-lab", "--credit", "1234.5", "--json")
    env.ok("accounts", "create", "acme", "--credit", "25.125")
    key = env.ok("keys", "create", "--account", "research-lab", "--name", "ci-runner-01", "--json")
    env.ok("keys", "create", "--account", "acme", "--rpm", "0", "--tpm", "150000")
    t = us("2025-01-31T12:00:00+00:00")
    models = ["gpt-oss-120b", "Qwen3-32B", "Mistral-Small-3.2-24B-Instruct-2506"]
    env.store_call("write_ledger", [
        LedgerRow(f"req_{i:02d}{'5b1f' * 7}", a["id"], key["id"], models[i % 3], "responses",
                  12_345 + i, 1_024, 3_987_123 + i, i % 5 == 0, "200" if i % 7 else "cancelled",
                  t + i * 61_000_000)
        for i in range(55)
    ])  # fmt: skip

    def rows(*args: str) -> list[str]:
        lines = env.run(*args, columns=80).stdout.splitlines()
        assert lines and all(len(line) <= 80 for line in lines), "\n".join(lines)
        return lines

    listed = rows("accounts", "list")
    assert len(listed) == 3  # header + one line per account
    assert all(w in listed[2] for w in ("research-lab", a["id"][:12], "$1234.28070675"))
    assert "$0.21929325" in listed[2]  # spent: the 55 requests below
    keys = rows("keys", "list")
    assert (
        len(keys) == 4 and keys[3] == "* the config default (ratelimit.default_rpm / default_tpm)"
    )
    assert all(
        w in keys[1] for w in (key["id"][:12], "research-lab", "ci-runner-01", "77", "9,999*")
    )
    assert all(w in keys[2] for w in ("acme", "unlimited", "150,000", "active"))

    usage = rows("usage")  # newest 50 of 55, newest first
    assert len(usage) == 1 + 50 + 2
    newest = usage[1]
    assert newest.startswith("2025-01-31 12:54 ") and newest.split()[-1] == "200"
    assert all(w in newest for w in ("research-lab", "gpt-oss-120b", "12,399", "1,024"))
    assert "$0.003987177" in newest
    assert any("Mistral-" in r and "…" in r for r in usage)  # a long model name is cut
    assert any(r.endswith("cancelled") for r in usage)
    assert any("~$0.003987" in r for r in usage)  # estimated
    assert usage[-2].startswith("newest 50 of 55 requests: $0.19") and "(--limit 0" in usage[-2]
    assert usage[-1].startswith("~ an estimated cost")


def test_keys_take_a_unique_prefix(env: Env) -> None:
    env.ok("accounts", "create", "acme")
    made = [env.ok("keys", "create", "--account", "acme", "--json")["id"] for _ in range(3)]
    new_ids = ["key_abcdef000001", "key_abcdef000002", "key_123456789abc"]
    with closing(sqlite3.connect(env.db)) as conn, conn:
        for old, new in zip(made, new_ids, strict=True):
            conn.execute("UPDATE api_keys SET id = ? WHERE id = ?", (new, old))

    listed = env.ok("keys", "list")  # short ids grow until they are unique, as git's do
    assert "key_abcdef000001" in listed and "key_abcdef000002" in listed
    assert "key_12345678 " in listed and "key_123456789" not in listed

    env.fails("keys", "revoke", "key_abcdef", message="'key_abcdef' is ambiguous: 2 keys")
    env.fails("keys", "update", "key_", "--rpm", "1", message="3 keys start so")
    env.fails("keys", "revoke", "key_123", message="too short: give at least 8 characters")
    env.fails("keys", "revoke", "key_999999", message="no key with id 'key_999999'")
    assert not any(k["revoked"] for k in env.ok("keys", "list", "--json"))

    assert env.ok("keys", "revoke", "key_12345678", "--json")["id"] == "key_123456789abc"
    assert env.ok("keys", "update", "key_abcdef000002", "--rpm", "3", "--json")["rpm"] == 3
    assert "Revoked key key_abcdef000001" in env.ok("keys", "revoke", "key_abcdef000001")


# ---- audit ----------------------------------------------------------------------------


def test_audit_uncharged_is_visible_and_ok(env: Env) -> None:
    acct = env.ok("accounts", "create", "acme", "--credit", "1", "--json")
    key = env.ok("keys", "create", "--account", "acme", "--json")
    env.store_call(
        "write_ledger",
        [LedgerRow("r1", acct["id"], key["id"], "m", "chat", 1, 2, 1_500_000_000, False, "200", 1)],
    )
    shown = env.ok("accounts", "show", "acme", "--json")
    assert (shown["balance"], shown["spent"], shown["uncharged"]) == ("0.00", "1.00", "0.50")
    [row] = env.ok("usage", "--json")
    assert (row["cost"], row["uncharged"]) == ("1.50", "0.50")

    report = env.ok("audit", "--json")
    assert report["ok"] is True and report["uncharged"] == "0.50"
    [a] = report["accounts"]
    assert (a["name"], a["balance"], a["expected_balance"], a["problems"]) == (
        "acme", "0.00", "0.00", []
    )  # fmt: skip
    human = env.ok("audit")
    assert "acme" in human and "$0.50 uncharged" in human
    assert human.rstrip().splitlines()[-1] == "ok"

    with closing(sqlite3.connect(env.db)) as conn, conn:
        conn.execute("UPDATE accounts SET balance = 5000000000")
    proc = env.run("audit")
    assert proc.returncode == 1, proc.stderr
    assert "5.00 USD too much" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1] == "1 problem"
    proc = env.run("audit", "--json", "--account", "acme")
    assert proc.returncode == 1 and json.loads(proc.stdout)["ok"] is False
    env.fails("audit", "--account", "ghost", message="no account named 'ghost'")


# ---- config handling ------------------------------------------------------------------


def test_bastion_config_env_var(env: Env) -> None:
    proc = env.run(
        "accounts", "create", "viaenv", "--json", config=False,
        env={"BASTION_CONFIG": str(env.config)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert env.store_call("get_account", "viaenv").name == "viaenv"


def test_database_url_env_overrides(env: Env, tmp_path: Path) -> None:
    env.ok("accounts", "create", "acme")
    other = tmp_path / "other.db"
    proc = env.run(
        "accounts", "create", "elsewhere", "--json",
        env={"BASTION_DATABASE_URL": f"sqlite:///{other}"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [a["name"] for a in env.ok("accounts", "list", "--json")] == ["acme"]
    with closing(sqlite3.connect(other)) as conn:
        assert conn.execute("SELECT name FROM accounts").fetchall() == [("elsewhere",)]


def test_relative_sqlite_url_is_relative_to_cwd(env: Env) -> None:
    env.config.write_text('[database]\nurl = "sqlite:///rel.db"\n')
    env.ok("accounts", "create", "acme")
    assert (env.dir / "rel.db").is_file()


def test_bad_config_is_one_line(env: Env) -> None:
    env.config.write_text("[database\n")
    env.fails("accounts", "list", message=str(env.config))
    env.config.unlink()
    env.fails("accounts", "list", message="cannot read config")
    env.config.write_text('[database]\nurl = "mysql://x"\n')
    env.fails("accounts", "list", message="unsupported database url")


def test_missing_implementation_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bastion.sim", None)  # import raises ImportError
    monkeypatch.setattr(sys, "argv", ["bastion", "sim"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 1


def test_negative_after_dashes_rewrite() -> None:
    rewrite = cli.negative_after_dashes
    assert rewrite(["accounts", "credit", "a", "--", "-0.5", "--json"]) == [
        "accounts", "credit", "a", "-0.5", "--json",
    ]  # fmt: skip
    assert rewrite(["accounts", "credit", "a", "--", "5"]) == ["accounts", "credit", "a", "--", "5"]
    assert rewrite(["accounts", "show", "--", "-x"]) == ["accounts", "show", "--", "-x"]


def test_iso_and_since_are_exact() -> None:
    moment = datetime(2025, 1, 31, 12, 0, 0, 1, tzinfo=UTC)
    micros = parse_time("--since", moment.isoformat())
    assert iso_time(micros) == "2025-01-31T12:00:00.000001Z"
    assert parse_time("--until", "2025-01-31T12:00:00.000001") == micros
