"""The control API without mitmproxy: a CallRequest in, a ControlAnswer out, against a real SQLite store."""

import asyncio
import json

import pytest

from agentkeys import credentials
from agentkeys.auth import Authenticator
from agentkeys.calls import CallRequest
from agentkeys.control import Control, Issuer
from agentkeys.keys import new_key_record
from agentkeys.ledger import SqliteLedger
from agentkeys.policy import Policy
from agentkeys.store import Store

NOW = 1_700_000_000.0
PARENT = Policy.model_validate(
    {
        "name": "orchestrator",
        "budget_usd": 1.0,
        "providers": ["openai"],
        "endpoints": ["POST /v1/chat/completions"],
        "models": ["gpt-4o-mini*"],
        "max_child_depth": 1,
        "max_children": 2,
    }
)
ISSUER_TOKEN = "issuer-secret-token"


@pytest.fixture
def control(tmp_path):
    store = Store(SqliteLedger(tmp_path / "control.db"), clock=lambda: NOW)
    yield Control(
        store,
        Authenticator(store, frozenset({"sk-real"}), store.clock),
        [Issuer("ci", ISSUER_TOKEN, {"orchestrator": PARENT})],
    )
    store.close()


def issue(control: Control, policy: Policy = PARENT, budget_usd: float = 1.0) -> str:
    issued = new_key_record(policy, 3600, budget_usd, "parent", NOW)
    control.store.ledger.create_key(issued.record)
    return issued.key


def ask(control: Control, method: str, path: str, key: str | None = None, body: dict | None = None):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    raw = json.dumps(body).encode() if body is not None else b""
    return asyncio.run(control.handle(CallRequest("agentkeys", method, path, headers, raw)))


def test_self_describes_the_calling_key_and_what_it_may_call(control):
    key = issue(control)
    answer = ask(control, "GET", "/_agentkeys/v1/keys/self", key)
    assert answer.status == 200
    assert answer.body["id"] == credentials.key_id_of(key)
    assert (answer.body["remaining_usd"], answer.body["models"], answer.body["children"]) == (1.0, ["gpt-4o-mini*"], [])


@pytest.mark.parametrize("key", [None, "ak_nosuch_secret", "sk-real"], ids=["none", "unknown", "real-key"])
def test_a_caller_without_a_valid_agent_key_is_401(control, key):
    assert ask(control, "GET", "/_agentkeys/v1/keys/self", key).status == 401


def test_a_child_is_carved_out_of_its_parents_budget(control):
    parent = issue(control)
    answer = ask(control, "POST", "/_agentkeys/v1/keys", parent, {"name": "sub", "budget_usd": 0.25, "ttl": "10m"})
    assert answer.status == 201 and answer.body["key"].startswith("ak_")
    assert answer.body["parent_id"] == credentials.key_id_of(parent)
    assert ask(control, "GET", "/_agentkeys/v1/keys/self", parent).body["remaining_usd"] == 0.75


@pytest.mark.parametrize(
    ("request_body", "fragment"),
    [
        ({"name": "sub", "budget_usd": 2, "ttl": "10m"}, "budget_usd"),
        ({"name": "sub", "budget_usd": 0.1, "ttl": "2h"}, "outlive the parent"),
        ({"name": "sub", "budget_usd": 0.1, "ttl": "10m", "models": ["gpt-*"]}, "not within the parent"),
        ({"name": "sub", "budget_usd": 0.1, "ttl": "10m", "providers": ["anthropic"]}, "not allowed to the parent"),
    ],
    ids=["budget", "ttl", "wider-models", "other-provider"],
)
def test_a_child_may_never_widen_its_parent(control, request_body, fragment):
    answer = ask(control, "POST", "/_agentkeys/v1/keys", issue(control), request_body)
    assert answer.status == 403 and fragment in answer.body["error"]["message"]


def test_a_bad_child_request_is_400(control):
    answer = ask(control, "POST", "/_agentkeys/v1/keys", issue(control), {"name": "sub", "budget_usd": -1})
    assert answer.status == 400


def test_a_key_revokes_its_child_but_not_a_stranger(control):
    parent, stranger = issue(control), issue(control)
    child = ask(control, "POST", "/_agentkeys/v1/keys", parent, {"name": "sub", "budget_usd": 0.1, "ttl": "10m"})
    child_id = child.body["id"]
    assert ask(control, "DELETE", f"/_agentkeys/v1/keys/{child_id}", stranger).status == 404
    assert ask(control, "DELETE", f"/_agentkeys/v1/keys/{child_id}", parent).status == 200
    assert ask(control, "GET", "/_agentkeys/v1/keys/self", child.body["key"]).status == 401


def test_an_issuer_mints_from_its_policies_only_within_their_limits(control):
    minted = ask(control, "POST", "/_agentkeys/v1/keys", ISSUER_TOKEN, {"policy": "orchestrator", "budget_usd": 0.5})
    assert minted.status == 201 and minted.body["budget_usd"] == 0.5
    assert ask(control, "POST", "/_agentkeys/v1/keys", ISSUER_TOKEN, {"policy": "other"}).status == 403
    too_much = ask(control, "POST", "/_agentkeys/v1/keys", ISSUER_TOKEN, {"policy": "orchestrator", "budget_usd": 5})
    assert too_much.status == 403


def test_an_unknown_route_is_404(control):
    assert ask(control, "GET", "/_agentkeys/v1/nothing", issue(control)).status == 404


def test_a_key_sees_its_limits_and_a_child_asking_for_looser_ones_is_refused(control):
    limited = Policy.model_validate(
        {**PARENT.model_dump(), "rate_limits": {"requests_per_minute": 30}, "max_identical_calls": "3 per 10m"}
    )
    parent = issue(control, limited)
    body = ask(control, "GET", "/_agentkeys/v1/keys/self", parent).body
    assert (body["rate_limits"], body["max_identical_calls"], body["max_calls"]) == (
        {"requests_per_minute": 30}, "3 per 10m", None)  # fmt: skip
    wider = {"name": "sub", "budget_usd": 0.1, "ttl": "10m", "rate_limits": {"requests_per_minute": 31}}
    refused = ask(control, "POST", "/_agentkeys/v1/keys", parent, wider)
    assert refused.status == 403 and "rate_limits requests_per_minute are wider than the parent's" in refused.body[
        "error"]["message"]  # fmt: skip
    narrower = {**wider, "rate_limits": {"requests_per_minute": 10}, "max_calls": 50}
    child = ask(control, "POST", "/_agentkeys/v1/keys", parent, narrower).body["key"]
    body = ask(control, "GET", "/_agentkeys/v1/keys/self", child).body
    assert (body["rate_limits"], body["max_identical_calls"], body["max_calls"]) == (
        {"requests_per_minute": 10}, "3 per 10m", 50)  # fmt: skip
