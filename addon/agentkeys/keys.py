"""Issuing a key: a policy, a lifetime and a budget become a record in the ledger and a secret, once."""

import time
from dataclasses import dataclass

from agentkeys import credentials
from agentkeys.ledger import KeyRecord, Ledger
from agentkeys.money import usd_to_micros
from agentkeys.policy import Policy


@dataclass(frozen=True)
class IssuedKey:
    key: str  # the only time the secret exists outside the agent
    record: KeyRecord


def issue_key(
    ledger: Ledger, policy: Policy, ttl_seconds: int | None = None, budget_usd: float | None = None, name: str = ""
) -> IssuedKey:
    """Mint a key under `policy`; `ttl_seconds` and `budget_usd` default to the policy's own."""
    budget = policy.budget_usd if budget_usd is None else budget_usd
    if budget <= 0:
        raise ValueError("a key's budget must be positive")
    minted = credentials.mint()
    now = time.time()
    record = KeyRecord(
        key_id=minted.key_id, key_hash=minted.key_hash, name=name or policy.name, policy_name=policy.name,
        policy_json=policy.model_dump_json(), created_at=now, expires_at=now + (ttl_seconds or policy.ttl),
        budget_micros=usd_to_micros(budget),
    )  # fmt: skip
    ledger.create_key(record)
    return IssuedKey(minted.key, record)
