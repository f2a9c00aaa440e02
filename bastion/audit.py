"""The books audit behind ``bastion audit`` and ``GET /admin/v1/audit``.

Every account's balance is a running figure the store keeps up to date as credits
and ledger rows arrive; the audit recomputes it from the records themselves and says
where the two disagree. The records are the truth an operator can defend to a
customer, so the invariant checked is, per account:

    balance = Σ credits − Σ (ledger.cost − ledger.uncharged)  and  balance ≥ 0
    spent = Σ (cost − uncharged),  uncharged = Σ ledger.uncharged
    Σ live leases ≤ balance

plus every dead letter: a request that was served but whose ledger row the store
refused, so it is missing from the books. Per key with a spend limit, per period:

    spent = seeded + Σ cost of the ledger rows counted in the period,  over_limit = 0

``over_limit`` is spend past the key's limit that no lease backed (a gateway cut off
from the store settled it): recorded in full, and reported, since the limit promised
it could not happen. All figures come from one snapshot (``Store.audit_data``), so a
gateway writing the ledger meanwhile cannot make a consistent database look broken.

Uncharged money and estimated rows are shown but are not problems: they are
served-but-not-collected money and costs the upstream never reported, both already
visible in the ledger, not discrepancies in it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bastion.money import format_usd
from bastion.store import Account, AuditData, KeyBudget, NotFound, Store


async def run_audit(store: Store, account: str | None = None) -> dict[str, Any]:
    """Audit every account, or only the one named ``account`` (NotFound if unknown).

    Returns ``{"ok", "problems", "uncharged", "dead_letters", "accounts": […]}``:
    ``ok`` is true when neither an account nor the books as a whole have a problem;
    top-level ``problems`` are the ones no known account owns (a dead letter for an
    account id that does not exist), reported only when auditing everything.
    """
    data = await store.audit_data()
    accounts = sorted(data.accounts, key=lambda a: a.name)
    if account is not None:
        accounts = [a for a in accounts if a.name == account]
        if not accounts:
            raise NotFound(f"no account named {account!r}")

    budgets: dict[str, list[KeyBudget]] = {}
    for budget in data.key_budgets:
        budgets.setdefault(budget.account_id, []).append(budget)
    reports = [_account_report(a, data, budgets.get(a.id, [])) for a in accounts]
    known = {a.id for a in data.accounts}
    orphans = [d for d in data.dead_letters if d[1] not in known] if account is None else []
    problems = [
        f"request {rid} was served for account id {aid}, which does not exist, and has no"
        f" ledger row (the store refused it: {error}); its whole row is kept in the"
        " dead_letters table"
        for rid, aid, error in orphans
    ]
    uncharged = sum(data.ledger.get(a.id, (0, 0, 0, 0))[2] for a in accounts)
    return {
        "ok": not problems and not any(r["problems"] for r in reports),
        "problems": problems,
        "uncharged": format_usd(uncharged),
        "dead_letters": sum(r["dead_letters"] for r in reports) + len(orphans),
        "accounts": reports,
    }


def problem_count(report: dict[str, Any]) -> int:
    """How many problems a ``run_audit`` result lists, top-level and per account."""
    return len(report["problems"]) + sum(len(a["problems"]) for a in report["accounts"])


def _account_report(account: Account, data: AuditData, budgets: list[KeyBudget]) -> dict[str, Any]:
    """One account's figures as recorded and as recomputed, and what disagrees."""
    credits = data.grants.get(account.id, 0)
    rows, cost, uncharged, estimated = data.ledger.get(account.id, (0, 0, 0, 0))
    collected = cost - uncharged
    expected = credits - collected
    leased = data.leases.get(account.id, 0)
    dead = [(rid, error) for rid, aid, error in data.dead_letters if aid == account.id]
    name = account.name

    problems: list[str] = []
    if account.balance != expected:
        gap = account.balance - expected
        problems.append(
            f"balance is {format_usd(account.balance)} USD but credits minus collected costs"
            f" come to {format_usd(expected)} USD: {format_usd(abs(gap))} USD"
            f" {'too much' if gap > 0 else 'too little'}. The balance was changed outside"
            " Bastion, or a credit or ledger row was added or removed by hand; compare"
            f" `bastion usage --account {name}` and the credits table with the balance"
        )
    if account.balance < 0:
        problems.append(
            f"balance is below zero ({format_usd(account.balance)} USD): Bastion never"
            " collects more than an account holds, so this was written outside it;"
            " find what changed it before crediting the account"
        )
    if account.spent != collected:
        problems.append(
            f"spent is {format_usd(account.spent)} USD but the ledger collected"
            f" {format_usd(collected)} USD (Σ cost − uncharged over {rows} rows): the"
            " spent column was changed outside Bastion, or ledger rows were edited"
        )
    if account.uncharged != uncharged:
        problems.append(
            f"uncharged is {format_usd(account.uncharged)} USD but the ledger's rows add up"
            f" to {format_usd(uncharged)} USD uncharged: the column or the rows were changed"
            " outside Bastion"
        )
    if leased > account.balance:
        problems.append(
            f"running gateways hold {format_usd(leased)} USD of leases, more than the"
            f" balance of {format_usd(account.balance)} USD, so they may admit requests the"
            " account cannot pay for; look at the leases table (a lease written by hand, or"
            " a balance lowered outside Bastion)"
        )
    for budget in budgets:
        problems += _budget_problems(budget)
    for request_id, error in dead:
        problems.append(
            f"request {request_id} was served but has no ledger row (the store refused it:"
            f" {error}); its whole row is kept in the dead_letters table, to charge or"
            " write off by hand"
        )

    return {
        "name": name,
        "id": account.id,
        "balance": format_usd(account.balance),
        "expected_balance": format_usd(expected),
        "credits": format_usd(credits),
        "spent": format_usd(account.spent),
        "uncharged": format_usd(account.uncharged),
        "rows": rows,
        "estimated_rows": estimated,
        "leased": format_usd(leased),
        "stale_leases": format_usd(data.stale_leases.get(account.id, 0)),
        "dead_letters": len(dead),
        "problems": problems,
    }


def _budget_problems(budget: KeyBudget) -> list[str]:
    """What disagrees in one key's spend-limit budget for one period."""
    since = datetime.fromtimestamp(budget.period_start // 1_000_000, UTC)
    period = "for all time" if budget.period_start == 0 else f"since {since:%Y-%m-%dT%H:%M:%SZ}"
    key = f"key {budget.key_id} ({period})"
    problems = []
    expected = budget.seeded + budget.ledger
    if budget.spent != expected:
        gap = budget.spent - expected
        problems.append(
            f"{key}: its budget says {format_usd(budget.spent)} USD spent, but the ledger"
            f" rows counted in the period come to {format_usd(budget.ledger)} USD (plus"
            f" {format_usd(budget.seeded)} USD the budget opened with):"
            f" {format_usd(abs(gap))} USD {'too much' if gap > 0 else 'too little'}. The"
            " key_budgets table or ledger rows were changed outside Bastion"
        )
    if budget.over_limit:
        problems.append(
            f"{key}: spent {format_usd(budget.over_limit)} USD past its spend limit. A gateway"
            " cut off from the store settled costs its lease on the key's budget no longer"
            " backed; they are recorded in full and were collected from the account as"
            " usual. Look for gateways that lost their leases then (their log, and"
            " bastion_credit_leases_given_up_total)"
        )
    return problems
