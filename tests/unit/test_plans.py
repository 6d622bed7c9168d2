"""Plan files (validated like policies: file, line and field) and the calendar their periods follow."""

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agentkeys.ledger import Calendar
from agentkeys.plans import current_plans, load_plan
from agentkeys.policy import ProxyConfig, load_config
from agentkeys.yamlfile import ConfigError

REPO = Path(__file__).resolve().parents[2]
POLICY = (REPO / "policies" / "example.policy.yaml").read_text()


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def plan_dir(tmp_path):
    write(tmp_path, "chat.policy.yaml", POLICY)
    return tmp_path


def test_the_bundled_plans_load_with_their_policies():
    for path in sorted((REPO / "plans").glob("*.plan.yaml")):
        loaded = load_plan(path)
        assert loaded.policies and loaded.default_policy.name in loaded.policies


def test_a_plan_names_its_policies_by_file_and_the_first_is_the_default(plan_dir):
    write(plan_dir, "research.policy.yaml", (REPO / "policies" / "research-agent.policy.yaml").read_text())
    path = write(
        plan_dir, "pro.plan.yaml",
        "name: pro\nbudget_usd: 20\nperiod: month\npolicies: [chat.policy.yaml, research.policy.yaml]\n",
    )  # fmt: skip
    loaded = load_plan(path)
    assert (loaded.plan.budget_usd, loaded.plan.period) == (20, "month")
    assert list(loaded.policies) == ["example", "research-agent"] and loaded.default_policy.name == "example"


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("name: p\nbudget_usd: 5\nperiod: fortnight\npolicies: [chat.policy.yaml]\n", 3, "period: Input should be"),
        ("name: p\nbudget_usd: -1\nperiod: day\npolicies: [chat.policy.yaml]\n", 2, "budget_usd: Input should be"),
        ("name: p\nbudget_usd: 5\nperiod: day\npolicies: [nowhere.policy.yaml]\n", 4, "policies: no such policy file"),
        ("name: p\nbudget_usd: 5\nperiod: day\npolicies: []\n", 4, "policies: List should have at least 1"),
        ("name: p\nbudget_usd: 5\nperiod: day\npolicies: [chat.policy.yaml]\nrate_limits: {rpm: 5}\n", 5,
         "rate_limits.rpm: Extra inputs"),
        ("name: p\nbudget_usd: 5\nperiod: day\npolicies: [chat.policy.yaml]\nbudget: 5\n", 5, "budget: Extra inputs"),
        ("name: p\nperiod: day\npolicies: [chat.policy.yaml]\n", 1, "budget_usd: Field required"),
    ],
)  # fmt: skip
def test_a_bad_plan_is_refused_with_its_file_line_and_field(plan_dir, text, line, fragment):
    path = write(plan_dir, "bad.plan.yaml", text)
    with pytest.raises(ConfigError) as refused:
        load_plan(path)
    assert f"{path}:{line}: {fragment}" in str(refused.value)


def test_a_plan_whose_policy_file_is_bad_is_refused_naming_the_policy_file(plan_dir):
    write(plan_dir, "broken.policy.yaml", "name: broken\nbudget_usd: 1\n")
    path = write(plan_dir, "p.plan.yaml", "name: p\nbudget_usd: 5\nperiod: day\npolicies: [broken.policy.yaml]\n")
    with pytest.raises(ConfigError, match=r"broken\.policy\.yaml:1: providers: Field required"):
        load_plan(path)


def test_the_config_names_plan_files_and_two_files_may_not_define_one_plan(plan_dir):
    write(plan_dir, "a.plan.yaml", "name: same\nbudget_usd: 5\nperiod: day\npolicies: [chat.policy.yaml]\n")
    write(plan_dir, "b.plan.yaml", "name: other\nbudget_usd: 5\nperiod: week\npolicies: [chat.policy.yaml]\n")
    config = write(plan_dir, "agentkeys.yaml", "plans: ['*.plan.yaml']\ntime_zone: Europe/Paris\n")
    assert sorted(current_plans(load_config(config))) == ["other", "same"]
    write(plan_dir, "b.plan.yaml", "name: same\nbudget_usd: 6\nperiod: week\npolicies: [chat.policy.yaml]\n")
    with pytest.raises(ConfigError, match="plan same is also defined by another file"):
        current_plans(load_config(config))


def test_a_config_with_an_unknown_time_zone_is_refused_on_its_line(tmp_path):
    config = write(tmp_path, "agentkeys.yaml", "store: sqlite:///x.db\ntime_zone: Mars/Olympus\n")
    with pytest.raises(ConfigError, match=r"agentkeys.yaml:2: time_zone: 'Mars/Olympus' is not a time zone"):
        load_config(config)


# ----- the calendar -----


def at(text: str, zone: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


@pytest.mark.parametrize(
    "kind, moment, period_id, starts, ends",
    [
        ("day", "2026-12-01T23:59:59", "2026-12-01", "2026-12-01T00:00", "2026-12-02T00:00"),
        ("week", "2026-12-06T12:00", "2026-W49", "2026-11-30T00:00", "2026-12-07T00:00"),  # a Sunday: Monday's week
        ("week", "2027-01-01T00:00", "2026-W53", "2026-12-28T00:00", "2027-01-04T00:00"),  # ISO week of its Monday
        ("month", "2026-12-31T23:00", "2026-12", "2026-12-01T00:00", "2027-01-01T00:00"),
        ("month", "2028-02-29T10:00", "2028-02", "2028-02-01T00:00", "2028-03-01T00:00"),
    ],
)
def test_each_period_runs_from_local_midnight_to_local_midnight(kind, moment, period_id, starts, ends):
    period = Calendar("Europe/Paris").period(kind, at(moment, "Europe/Paris"))
    assert period.period_id == period_id
    assert (period.starts_at, period.ends_at) == (at(starts, "Europe/Paris"), at(ends, "Europe/Paris"))


def test_a_day_when_the_clocks_change_is_23_or_25_hours_long():
    calendar = Calendar("Europe/Paris")
    spring, autumn = (
        calendar.period("day", at("2026-03-29T12:00", "Europe/Paris")),
        calendar.period("day", at("2026-10-25T12:00", "Europe/Paris")),
    )
    assert (spring.ends_at - spring.starts_at, autumn.ends_at - autumn.starts_at) == (23 * 3600, 25 * 3600)


def test_the_ids_of_the_present_change_exactly_at_midnight_in_the_zone():
    calendar = Calendar("America/New_York")
    midnight = at("2026-12-01T00:00", "America/New_York")
    before, after = calendar.period_ids(midnight - 0.001), calendar.period_ids(midnight)
    assert (before.day, before.month) == ("2026-11-30", "2026-11")
    assert (after.day, after.week, after.month) == ("2026-12-01", "2026-W49", "2026-12")
    assert calendar.period_ids(midnight - 0.001) == before  # the cache is per day, not per last answer


def test_the_default_config_counts_periods_in_utc():
    assert ProxyConfig().calendar.period_ids(0).day == "1970-01-01"
