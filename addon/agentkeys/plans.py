"""Plans: what an account (a user or tenant of the operator's product) may spend, and on what.

A plan is a file like a policy (`*.plan.yaml`), parsed once into a typed `Plan`; a bad file is refused
with its file, line and field, and so is a plan naming a policy file that does not load. The config's
`plans:` names the files; accounts live in the store and name their plan.

    name: pro
    budget_usd: 20        # per period, over every key minted for the account
    period: month         # day, week or month, on the calendar in the config's `time_zone`
    policies: [research-agent.policy.yaml]   # keys of the account are minted from these only
    rate_limits: {requests_per_minute: 600}   # shared by every key of the account (see limits.md)
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from agentkeys.ledger.periods import PeriodKind
from agentkeys.policy import BudgetUsd, Policy, ProxyConfig, RateLimits, file_revision, load_policy
from agentkeys.yamlfile import ConfigError, load_yaml_model

# Account ids are chosen by the operator's backend (its user or tenant id): safe in store key names and URLs.
ACCOUNT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
ACCOUNT_ID_RULE = "1 to 128 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
MIN_ADMIN_TOKEN_CHARS = 16


class Plan(BaseModel):
    """A recurring budget over every key of an account, and the policies those keys may be minted from."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    budget_usd: BudgetUsd = Field(description="per period, over every key minted for the account")
    period: PeriodKind = Field(description="day, week or month, on the calendar in the config's time_zone")
    policies: list[str] = Field(
        min_length=1, description="policy files (relative to the plan's folder) an account's keys may be minted from"
    )
    rate_limits: RateLimits = Field(
        default_factory=RateLimits, description="shared by every key of the account, with each key's own (limits.md)"
    )

    @field_validator("policies")
    @classmethod
    def policy_files_exist(cls, paths: list[str], info: ValidationInfo) -> list[str]:
        base_dir = (info.context or {}).get("base_dir")
        missing = [path for path in paths if base_dir is not None and not (base_dir / path).is_file()]
        if missing:
            raise ValueError(f"no such policy file: {', '.join(missing)}")
        return paths


@dataclass(frozen=True)
class PlanFile:
    """A plan as its file says now, with the policies its keys may be minted from, by name."""

    plan: Plan
    policies: dict[str, Policy]
    revision: str

    @property
    def default_policy(self) -> Policy:
        """The first policy the plan names: a key minted without naming one gets it."""
        return next(iter(self.policies.values()))


def load_plan(path: Path) -> PlanFile:
    """A plan file and the policy files it names; ConfigError naming the file, line and field if either is bad."""
    path = Path(path).resolve()
    plan = load_yaml_model(path, Plan, base_dir=path.parent)
    policies: dict[str, Policy] = {}
    for policy_path in plan.policies:
        policy = load_policy(path.parent / policy_path)
        policies.setdefault(policy.name, policy)
    return PlanFile(plan, policies, file_revision(path))


def current_plans(config: ProxyConfig) -> dict[str, PlanFile]:
    """The config's plan files (globs allowed), by plan name; two files may not name the same plan."""
    found: dict[str, PlanFile] = {}
    for pattern in config.plans:
        matched = sorted(config.base_dir.glob(pattern)) if any(c in pattern for c in "*?[") else [config.path(pattern)]
        for path in matched:
            loaded = load_plan(path)
            if loaded.plan.name in found and found[loaded.plan.name].revision != loaded.revision:
                raise ConfigError([f"{path}: name: plan {loaded.plan.name} is also defined by another file"])
            found[loaded.plan.name] = loaded
    return found


def admin_token(env_name: str) -> str:
    """The admin API's token from the environment; ConfigError if it is missing or too short to be a secret."""
    token = os.environ.get(env_name, "")
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        need = f"at least {MIN_ADMIN_TOKEN_CHARS} characters"
        raise ConfigError([f"admin_port is set, so {env_name} must hold the admin API's token ({need})"])
    return token
