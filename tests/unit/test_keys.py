"""Child keys: a narrower copy of the parent's policy, never wider, and never more unmetered endpoints."""

import dataclasses

import pytest

from agentkeys.keys import (
    ChildRefused,
    ChildRequest,
    check_depth_and_lifetime,
    child_policy,
    child_refusal_message,
    describe,
    glob_within,
    issue_key,
    new_key_record,
)
from agentkeys.ledger import KeyRecord, Refusal, SqliteLedger
from agentkeys.money import Usd
from agentkeys.policy import Policy, parse_budget
from agentkeys.seal import RecordSeal

PARENT = Policy.model_validate(
    {
        "name": "parent",
        "budget_usd": 1,
        "providers": ["openai", "anthropic"],
        "endpoints": ["POST /v1/chat/completions", "GET /v1/models/*", "* /v1/responses/**"],
        "models": ["gpt-4o*", "claude-haiku-4-5"],
        "unmetered_endpoints": ["GET /v1/files", "GET /v1/files/*", "POST /v1/batches/**"],
    }
)


def child(**asked) -> Policy:
    request = {"name": "c", "budget_usd": 0.1, "ttl": "5m", **asked}
    return child_policy(PARENT, ChildRequest.model_validate(request))


@pytest.mark.parametrize(
    ("inner", "outer", "within"),
    [
        ("gpt-4o", "gpt-4o*", True),
        ("gpt-4o-mini", "gpt-4o*", True),
        ("gpt-4o-mini*", "gpt-4o*", True),
        ("gpt-4o*", "gpt-4o*", True),
        ("gpt-*", "gpt-4o*", False),
        ("gpt*", "gpt-4o*", False),
        ("*", "gpt-4o*", False),
        ("gpt-4*", "gpt-4o*", False),
        ("gpt-4o?", "gpt-4o*", False),  # unsure: refused
        ("gpt-5", "gpt-4o*", False),
        ("gpt-4o-X1", "gpt-4o*", True),  # a literal name, whatever its letters
        ("claude-haiku-4-5", "claude-haiku-4-5", True),
        ("claude-haiku-4-5*", "claude-haiku-4-5", False),
        ("claude-haiku-4-5-x", "claude-haiku-4-5", False),
    ],
)
def test_a_model_glob_is_within_only_when_every_name_it_matches_is(inner, outer, within):
    assert glob_within(inner, outer) is within


@pytest.mark.parametrize("models", [["gpt-*"], ["gpt-4o", "gpt-*"], ["*"], ["claude-*"]])
def test_a_child_asking_for_wider_models_is_refused(models):
    with pytest.raises(ChildRefused, match="models"):
        child(models=models)


def test_a_child_asking_for_narrower_models_gets_them():
    assert child(models=["gpt-4o-mini*"]).models == ["gpt-4o-mini*"]


@pytest.mark.parametrize(
    "endpoints",
    [["POST /v1/*"], ["* /v1/chat/completions"], ["GET /v1/models/**"], ["GET /v1/models/a/b"], ["POST /v1/responses"]],
)
def test_a_child_asking_for_wider_endpoints_is_refused(endpoints):
    with pytest.raises(ChildRefused, match="endpoints"):
        child(endpoints=endpoints)


def test_a_child_may_ask_for_endpoints_within_the_parent_s():
    asked = ["GET /v1/models/gpt-4o", "POST /v1/responses/*/cancel", "GET /v1/responses/**"]
    assert [str(rule) for rule in child(endpoints=asked).endpoints] == asked


def test_a_child_gets_no_unmetered_endpoint_it_did_not_ask_for():
    policy = child()
    assert policy.unmetered_endpoints == []
    assert not policy.allows_unmetered("GET", "/v1/files")


def test_a_child_gets_the_unmetered_endpoints_it_asks_for_within_the_parent_s():
    policy = child(unmetered_endpoints=["GET /v1/files/*", "POST /v1/batches/abc/cancel"])
    assert policy.allows_unmetered("GET", "/v1/files/file-1")
    assert policy.allows_unmetered("POST", "/v1/batches/abc/cancel")
    assert not policy.allows_unmetered("GET", "/v1/files")
    assert not policy.allows_unmetered("POST", "/v1/batches/other")


@pytest.mark.parametrize(
    "asked", [["GET /v1/files*"], ["* /v1/files"], ["GET /v1/files/**"], ["POST /v1/uploads"], ["POST /v1/**"]]
)
def test_a_child_asking_for_wider_unmetered_endpoints_is_refused(asked):
    with pytest.raises(ChildRefused, match="unmetered_endpoints"):
        child(unmetered_endpoints=asked)


def test_a_parent_with_no_unmetered_endpoints_can_give_none():
    parent = PARENT.model_copy(update={"unmetered_endpoints": []})
    request = ChildRequest.model_validate({"name": "c", "budget_usd": 0.1, "ttl": "5m",
                                           "unmetered_endpoints": ["GET /v1/files"]})  # fmt: skip
    with pytest.raises(ChildRefused, match=r"parent's \(none\)"):
        child_policy(parent, request)


def test_a_child_asking_for_a_provider_its_parent_lacks_is_refused_saying_which():
    with pytest.raises(ChildRefused) as refused:
        child(providers=["openai", "gemini", "azure"])
    assert str(refused.value) == "providers gemini, azure are not allowed to the parent (openai, anthropic)"


def test_a_child_gets_only_the_providers_it_asks_for():
    assert child(providers=["anthropic"]).providers == ["anthropic"]
    assert child().providers == PARENT.providers


def test_refusals_name_what_is_wider_and_what_the_parent_allows():
    with pytest.raises(ChildRefused) as refused:
        child(endpoints=["POST /v1/*", "GET /v1/files"])
    assert str(refused.value) == (
        "endpoints POST /v1/*, GET /v1/files are not within the parent's"
        " (POST /v1/chat/completions, GET /v1/models/*, * /v1/responses/**)"
    )
    with pytest.raises(ChildRefused) as refused:
        child(unmetered_endpoints=["POST /v1/uploads", "GET /v1/**"])
    assert str(refused.value) == (
        "unmetered_endpoints POST /v1/uploads, GET /v1/** are not within the parent's"
        " (GET /v1/files, GET /v1/files/*, POST /v1/batches/**)"
    )
    with pytest.raises(ChildRefused) as refused:
        child(models=["gpt-*", "o3"])
    assert str(refused.value) == "models gpt-*, o3 are not within the parent's (gpt-4o*, claude-haiku-4-5)"


def test_a_child_policy_is_named_for_what_it_is_and_takes_its_own_budget_and_lifetime():
    policy = child(budget_usd=0.25, ttl="90s", models=["gpt-4o"])
    named = "parent, narrowed for child key c"
    assert (policy.name, policy.budget_usd, policy.ttl, policy.models) == (named, 0.25, 90, ["gpt-4o"])
    assert policy.endpoints == PARENT.endpoints and policy.max_child_depth == PARENT.max_child_depth


# ----- depth and lifetime -----

NOW = 1_700_000_000.0


def parent_at(depth: int, expires_in: float) -> KeyRecord:
    return KeyRecord(key_id="p", key_hash="h", name="p", policy_name="parent", policy_json="{}", created_at=NOW,
                     expires_at=NOW + expires_in, budget_micros=10**6, depth=depth)  # fmt: skip


def check(depth: int, max_depth: int, ttl: str, expires_in: float) -> None:
    policy = PARENT.model_copy(update={"max_child_depth": max_depth})
    request = ChildRequest.model_validate({"name": "c", "budget_usd": 0.1, "ttl": ttl})
    check_depth_and_lifetime(parent_at(depth, expires_in), policy, request, NOW)


@pytest.mark.parametrize("max_depth", [1, 2, 5])
def test_a_child_one_level_deeper_than_the_policy_allows_is_refused_saying_so(max_depth):
    check(max_depth - 1, max_depth, "5m", 3600)  # its child is at the deepest level allowed
    with pytest.raises(ChildRefused) as refused:
        check(max_depth, max_depth, "5m", 3600)
    assert str(refused.value) == (
        f"max_child_depth: policy parent allows {max_depth} level(s) of child keys and this key is at depth {max_depth}"
    )


def test_a_policy_without_child_levels_mints_none():
    with pytest.raises(ChildRefused, match="allows 0 level"):
        check(0, 0, "5m", 3600)


def test_a_child_may_live_exactly_as_long_as_its_parent_and_not_a_second_more():
    check(0, 1, "300s", 300)
    with pytest.raises(ChildRefused) as refused:
        check(0, 1, "301s", 300)
    assert str(refused.value) == (
        "ttl: 301s would outlive the parent, which expires at 2023-11-14T22:18:20+00:00 (300s from now)"
    )


def test_a_child_key_belongs_to_its_parents_account_and_its_job():
    """A sub-agent spends from the account its parent was minted for (and is traced to the same job)."""
    policy = Policy.model_validate(
        {"name": "p", "budget_usd": 1, "providers": ["openai"], "endpoints": ["POST /v1/chat/completions"],
         "models": ["gpt-4o-mini"]}
    )  # fmt: skip
    parent = new_key_record(policy, 600, 1.0, "parent", 0.0, identity_json='{"job": "j"}').record
    parent = dataclasses.replace(parent, account_id="acme")
    child = new_key_record(policy, 60, 0.5, "child", 0.0, parent).record
    assert (child.account_id, child.identity_json, child.parent_id) == ("acme", '{"job": "j"}', parent.key_id)
    assert new_key_record(policy, 60, 0.5, "alone", 0.0).record.account_id is None
# ----- rate limits and the loop breaker -----

LIMITED = Policy.model_validate(
    {
        **PARENT.model_dump(),
        "rate_limits": {"requests_per_minute": 60, "concurrent_calls": 4},
        "max_identical_calls": "5 per 10m",
        "max_calls": 100,
    }
)


def limited_child(**asked) -> Policy:
    return child_policy(LIMITED, ChildRequest.model_validate({"name": "c", "budget_usd": 0.1, "ttl": "5m", **asked}))


def test_a_child_inherits_its_parent_s_limits():
    policy = limited_child()
    assert (policy.rate_limits, policy.max_identical_calls, policy.max_calls) == (
        LIMITED.rate_limits, LIMITED.max_identical_calls, 100)  # fmt: skip


def test_a_child_may_ask_for_tighter_limits_and_keeps_the_rest_of_its_parent_s():
    policy = limited_child(
        rate_limits={"requests_per_minute": 10, "tokens_per_minute": 5000}, max_identical_calls="2 per 1h", max_calls=5
    )
    limits = policy.rate_limits
    assert (limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_calls) == (10, 5000, 4)
    assert str(policy.max_identical_calls) == "2 per 1h" and policy.max_calls == 5


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ({"rate_limits": {"requests_per_minute": 61}}, "rate_limits requests_per_minute are wider than the parent's"
         " (requests_per_minute 60)"),
        ({"rate_limits": {"concurrent_calls": 5}}, "concurrent_calls"),
        ({"max_identical_calls": "6 per 10m"}, "max_identical_calls 6 per 10m is wider than the parent's (5 per 10m)"),
        ({"max_identical_calls": "5 per 5m"}, "max_identical_calls 5 per 5m"),
        ({"max_calls": 101}, "max_calls 101 is more than the parent's (100)"),
    ],
    ids=["rpm", "concurrency", "more-identical", "shorter-window", "max-calls"],
)
def test_a_child_asking_for_looser_limits_is_refused_saying_which(asked, message):
    with pytest.raises(ChildRefused, match=message.replace("(", r"\(").replace(")", r"\)")):
        limited_child(**asked)


def test_a_parent_without_limits_may_give_a_child_any():
    assert child(rate_limits={"requests_per_minute": 1000}).rate_limits.requests_per_minute == 1000


def test_a_key_is_described_with_what_it_may_still_spend_and_never_its_secret():
    record = dataclasses.replace(parent_at(0, 3600), spent_micros=120, held_micros=30, parent_id="q",
                                 identity_json='{"sub": "repo:x"}')  # fmt: skip
    assert describe(record, NOW) == {
        "id": "p", "name": "p", "policy": "parent", "parent_id": "q", "status": "active",
        "created_at": "2023-11-14T22:13:20+00:00", "expires_at": "2023-11-14T23:13:20+00:00",
        "budget_usd": Usd(10**6), "spent_usd": Usd(120), "held_usd": Usd(30), "remaining_usd": Usd(10**6 - 150),
        "identity": {"sub": "repo:x"}, "account_id": None,
    }  # fmt: skip
    expired = describe(record, NOW + 3600)
    assert (expired["status"], expired["remaining_usd"]) == ("expired", Usd(0))
    assert describe(parent_at(0, 3600), NOW)["identity"] is None


def test_a_new_key_is_one_level_below_its_parent_and_carries_its_identity():
    root = new_key_record(PARENT, 3600, 0.5, "root", NOW, identity_json='{"sub": "job"}')
    assert (root.record.depth, root.record.parent_id, root.record.identity_json) == (0, None, '{"sub": "job"}')
    assert (root.record.budget_micros, root.record.expires_at, root.record.name) == (500_000, NOW + 3600, "root")
    deeper = dataclasses.replace(root.record, depth=2)
    child = new_key_record(PARENT, 60, 0.1, "child", NOW, parent=deeper, identity_json='{"sub": "other"}')
    assert (child.record.depth, child.record.parent_id, child.record.identity_json) == (3, root.record.key_id,
                                                                                        '{"sub": "job"}')  # fmt: skip
    assert child.record.key_id != root.record.key_id and child.key != root.key


def test_an_issued_key_takes_the_policy_s_budget_and_lifetime_unless_given_and_is_stored(tmp_path, monkeypatch):
    monkeypatch.setattr("time.time", lambda: NOW)
    ledger = SqliteLedger(tmp_path / "keys.db")
    policy, seal = PARENT.model_copy(update={"ttl": 600}), RecordSeal(b"secret")
    default = issue_key(ledger, policy, seal=seal)  # its lifetime from the store's clock (SQLite: this machine's)
    assert (default.record.budget_micros, default.record.expires_at, default.record.name) == (1_000_000, NOW + 600,
                                                                                              "parent")  # fmt: skip
    given = issue_key(ledger, policy, ttl_seconds=60, budget_usd="0.25", name="ci", seal=seal)
    assert (given.record.budget_micros, given.record.expires_at, given.record.name) == (250_000, NOW + 60, "ci")
    assert ledger.get_key(given.record.key_id) == given.record and seal.intact(given.record)
    with pytest.raises(ValueError, match="^0: Input should be greater than 0$"):
        issue_key(ledger, policy, budget_usd=0, seal=seal)
    ledger.close()


@pytest.mark.parametrize(
    ("value", "read"), [("0.5", 0.5), (2, 2.0), ("1e9", 1e9)],
)
def test_a_budget_is_a_positive_finite_amount_of_dollars(value, read):
    assert parse_budget(value) == read


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "'0': Input should be greater than 0"),
        (-1, "-1: Input should be greater than 0"),
        ("inf", "'inf': Input should be a finite number"),
        ("1e10", "'1e10': Input should be less than or equal to 1000000000"),
        ("lots", "'lots': Input should be a valid number, unable to parse string as a number"),
    ],
)
def test_anything_else_is_not_a_budget(value, message):
    with pytest.raises(ValueError) as refused:
        parse_budget(value)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("refusal", "message"),
    [
        (Refusal.BUDGET, "budget_usd: asked $0.100000; of the parent's budget $0.001000 remains"),
        (Refusal.TOO_MANY_CHILDREN, "max_children: key p has as many live child keys as its policy allows"),
        (Refusal.REVOKED, "the parent key is revoked"),
        (Refusal.EXPIRED, "the parent key is expired"),
    ],
)
def test_a_child_refused_by_the_store_is_told_which_limit(refusal, message):
    parent = dataclasses.replace(parent_at(0, 3600), budget_micros=1_000)
    request = ChildRequest.model_validate({"name": "c", "budget_usd": 0.1, "ttl": "5m"})
    assert child_refusal_message(refusal, parent, request) == message
