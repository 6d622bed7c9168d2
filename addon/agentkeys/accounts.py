"""Account rules: creating an account on a plan, minting its keys, and how its usage is shown.

Shared by the admin API and `agentkeys accounts …`, over a blocking `Ledger`. Each rule raises
`AccountRefused` with a message that says what is wrong; the store itself enforces what money
depends on (a suspended account's keys are refused by the hold, not here).
"""

from dataclasses import replace
from typing import Literal, get_args

from agentkeys.keys import IssuedKey, describe, iso, new_key_record
from agentkeys.ledger import AccountRecord, Calendar, Ledger, PeriodSpend
from agentkeys.money import Usd, usd_to_micros
from agentkeys.plans import ACCOUNT_ID, ACCOUNT_ID_RULE, PlanFile
from agentkeys.policy import parse_budget
from agentkeys.seal import RecordSeal

Status = Literal["active", "suspended"]
STATUSES = get_args(Status)


class AccountRefused(Exception):
    """An account operation that cannot be done; `status` is the HTTP status the admin API answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


class UnknownAccount(AccountRefused):
    def __init__(self, account_id: str):
        super().__init__(f"no account {account_id}", status=404)


def plan_named(plans: dict[str, PlanFile], name: str) -> PlanFile:
    if name not in plans:
        known = ", ".join(sorted(plans)) or "none: the config names no plan files"
        raise AccountRefused(f"plan: no plan {name!r} (plans: {known})")
    return plans[name]


def new_account(account_id: str, name: str, plan: PlanFile, now: float) -> AccountRecord:
    if not ACCOUNT_ID.match(account_id):
        raise AccountRefused(f"account_id: {account_id!r} is not an account id ({ACCOUNT_ID_RULE})")
    return AccountRecord(
        account_id=account_id, name=name or account_id, plan_name=plan.plan.name, period=plan.plan.period,
        budget_micros=usd_to_micros(plan.plan.budget_usd), created_at=now,
    )  # fmt: skip


def changed_account(
    record: AccountRecord, plan: PlanFile | None = None, name: str | None = None, status: str | None = None
) -> AccountRecord:
    """The account with a new plan (its period and budget from then on), name or status."""
    if status is not None and status not in STATUSES:
        raise AccountRefused(f"status: {status!r} is not one of {', '.join(STATUSES)}")
    if plan is not None:
        budget = usd_to_micros(plan.plan.budget_usd)
        record = replace(record, plan_name=plan.plan.name, period=plan.plan.period, budget_micros=budget)
    return replace(record, name=record.name if name is None else name, status=status or record.status)


def existing_account(ledger: Ledger, account_id: str) -> AccountRecord:
    record = ledger.get_account(account_id)
    if record is None:
        raise UnknownAccount(account_id)
    return record


def mint_account_key(
    ledger: Ledger,
    account: AccountRecord,
    plans: dict[str, PlanFile],
    policy_name: str | None = None,
    ttl_seconds: int | None = None,
    budget_usd: float | None = None,
    name: str = "",
    *,
    seal: RecordSeal,
) -> IssuedKey:
    """A key for an active account, under one of its plan's policies (its first unless named); its own
    budget and lifetime default to the policy's, its lifetime starting on the store's clock, and its record
    sealed for the proxies (its account too). Every hold it takes must fit the account's period too."""
    if not account.active:
        raise AccountRefused(f"account {account.account_id} is {account.status}: no key can be minted for it", 409)
    plan = plan_named(plans, account.plan_name)
    if policy_name is None:
        policy = plan.default_policy
    elif policy_name in plan.policies:
        policy = plan.policies[policy_name]
    else:
        allowed = ", ".join(plan.policies)
        raise AccountRefused(
            f"policy: plan {plan.plan.name} does not allow policy {policy_name!r} (allowed: {allowed})"
        )
    budget = policy.budget_usd if budget_usd is None else parse_budget(budget_usd)
    issued = new_key_record(policy, ttl_seconds or policy.ttl, budget, name or policy.name, ledger.now())
    record = seal.sealed(replace(issued.record, account_id=account.account_id))
    ledger.create_key(record)
    return IssuedKey(issued.key, record)


def describe_account(account: AccountRecord, calendar: Calendar, current: PeriodSpend | None, now: float) -> dict:
    """An account as the admin API and the CLI show it, with its current period's books."""
    return {
        "id": account.account_id,
        "name": account.name,
        "plan": account.plan_name,
        "status": account.status,
        "created_at": iso(account.created_at),
        "period": account.period,
        "budget_usd": Usd(account.budget_micros),
        "current_period": describe_period(account, calendar, current, now),
    }


def describe_period(account: AccountRecord, calendar: Calendar, books: PeriodSpend | None, now: float) -> dict:
    """One period's books: this one (`books` None if nothing was held in it yet), or a past one."""
    period = calendar.period(account.period, now)
    books = books or PeriodSpend(account.account_id, period.period_id)
    budget = account.budget_micros + books.top_up_micros
    shown = {"id": books.period_id, "spent_usd": Usd(books.spent_micros), "held_usd": Usd(books.held_micros),
             "top_up_usd": Usd(books.top_up_micros)}  # fmt: skip
    if books.period_id != period.period_id:
        return shown  # a past period: its spend, as it was settled
    remaining = max(0, budget - books.spent_micros - books.held_micros)
    return {**shown, "starts_at": iso(period.starts_at), "ends_at": iso(period.ends_at),
            "budget_usd": Usd(budget), "remaining_usd": Usd(remaining)}  # fmt: skip


def current_books(ledger: Ledger, account: AccountRecord, calendar: Calendar, now: float) -> PeriodSpend | None:
    period_id = calendar.period(account.period, now).period_id
    return next((p for p in ledger.account_periods(account.account_id) if p.period_id == period_id), None)


def show_account(ledger: Ledger, account: AccountRecord, calendar: Calendar, now: float) -> dict:
    return describe_account(account, calendar, current_books(ledger, account, calendar, now), now)


def account_usage(ledger: Ledger, account: AccountRecord, calendar: Calendar, now: float) -> dict:
    """Every period the account has books for, newest first, the current one with its budget and what remains."""
    periods = [
        describe_period(account, calendar, books, now) for books in reversed(ledger.account_periods(account.account_id))
    ]
    current = calendar.period(account.period, now).period_id
    if not periods or periods[0]["id"] != current:
        periods.insert(0, describe_period(account, calendar, None, now))
    return {"account_id": account.account_id, "period": account.period, "time_zone": calendar.time_zone,
            "periods": periods}  # fmt: skip


def describe_keys(ledger: Ledger, account_id: str, now: float) -> list[dict]:
    return [describe(record, now) for record in ledger.account_keys(account_id)]
