"""The admin API on a real listener (uvicorn on its own thread) over a real store: accounts, their keys,
top-ups and usage; the token; and schemathesis's generated requests, none of which may get a 500."""

import os
import time
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks as schema_checks

from agentkeys.admin import AdminApi, AdminServer
from agentkeys.ledger import Calendar, Refusal, SqliteLedger
from agentkeys.plans import current_plans
from agentkeys.policy import load_config
from agentkeys.seal import RecordSeal, store_seal
from conftest import free_port, write_policy

TOKEN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_plans(directory: Path) -> Path:
    write_policy(directory, "chat", budget_usd=2.0)
    write_policy(directory, "batch", budget_usd=5.0)
    (directory / "pro.plan.yaml").write_text(
        "name: pro\nbudget_usd: 10\nperiod: month\npolicies: [chat.policy.yaml, batch.policy.yaml]\n"
    )
    (directory / "free.plan.yaml").write_text(
        "name: free\nbudget_usd: 0.5\nperiod: day\npolicies: [chat.policy.yaml]\n"
    )
    config = directory / "agentkeys.yaml"
    config.write_text("store: sqlite:///admin.db\nplans: ['*.plan.yaml']\ntime_zone: Europe/Paris\n")
    return config


class Admin:
    def __init__(self, url: str, ledger: SqliteLedger, seal: RecordSeal):
        self.url, self.ledger, self.seal = url, ledger, seal

    def __call__(self, method: str, path: str, status: int, token: str | None = TOKEN, **kwargs):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        answer = requests.request(method, self.url + path, headers=headers, timeout=10, **kwargs)
        assert answer.status_code == status, answer.text
        return answer.json() if answer.content else None


@pytest.fixture(scope="module")
def admin(tmp_path_factory):
    directory = tmp_path_factory.mktemp("admin")
    config = load_config(write_plans(directory))
    ledger = SqliteLedger(directory / "admin.db", calendar=config.calendar)
    port = free_port()
    seal = store_seal(config.path(config.certs_dir))  # the seal of the proxies on this config
    server = AdminServer(AdminApi(ledger, current_plans(config), config.calendar, TOKEN, seal))
    server.start("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            requests.get(url + "/openapi.json", timeout=1)
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline, "the admin API did not start"
            time.sleep(0.05)
    yield Admin(url, SqliteLedger(directory / "admin.db", calendar=config.calendar), seal)
    server.stop()


def test_an_account_is_created_on_a_plan_given_keys_topped_up_suspended_and_deleted(admin):
    account = admin("POST", "/accounts", 201, json={"account_id": "user-42", "plan": "pro", "name": "Ada"})
    assert (account["plan"], account["status"], account["budget_usd"], account["period"]) == (
        "pro",
        "active",
        10,
        "month",
    )
    assert account["current_period"]["remaining_usd"] == 10
    minted = admin("POST", "/accounts/user-42/keys", 201, json={"policy": "batch", "ttl": "30m", "budget_usd": 3})
    assert minted["key"].startswith("ak_") and (minted["account_id"], minted["policy"]) == ("user-42", "batch")
    assert minted["budget_usd"] == 3
    assert admin.seal.intact(admin.ledger.get_key(minted["id"])), "sealed, its account too, so a proxy trusts it"
    default = admin("POST", "/accounts/user-42/keys", 201, json={})
    assert (default["policy"], default["budget_usd"]) == ("chat", 2)  # the plan's first policy, its budget
    listed = admin("GET", "/accounts/user-42/keys", 200)
    assert [key["id"] for key in listed] == [minted["id"], default["id"]] and all("key" not in k for k in listed)
    assert admin("GET", f"/keys/{minted['id']}", 200)["status"] == "active"

    assert admin("POST", "/accounts/user-42/top-up", 200, json={"amount_usd": 2.5})["budget_usd"] == 12.5
    assert admin("PATCH", "/accounts/user-42", 200, json={"plan": "free"})["budget_usd"] == 0.5
    assert admin("POST", "/accounts/user-42/suspend", 200)["status"] == "suspended"
    assert admin.ledger.reserve(minted["id"], 1, time.time()).refusal is Refusal.SUSPENDED  # at once
    admin("POST", "/accounts/user-42/keys", 409, json={})
    assert admin("POST", "/accounts/user-42/resume", 200)["status"] == "active"
    assert admin.ledger.reserve(minted["id"], 1, time.time()).hold_id is not None

    assert admin("POST", f"/keys/{default['id']}/revoke", 200)["status"] == "revoked"
    admin("DELETE", "/accounts/user-42", 204)
    admin("GET", "/accounts/user-42", 404)
    assert admin("GET", f"/keys/{minted['id']}", 200)["status"] == "revoked"


def test_usage_shows_each_periods_spend_newest_first(admin):
    admin("POST", "/accounts", 201, json={"account_id": "usage-1", "plan": "free"})
    key = admin("POST", "/accounts/usage-1/keys", 201, json={"budget_usd": 1})
    now = time.time()
    yesterday = admin.ledger.reserve(key["id"], 100_000, now - 86_400)
    today = admin.ledger.reserve(key["id"], 50_000, now)
    admin.ledger.settle(yesterday.hold_id, 70_000)
    usage = admin("GET", "/accounts/usage-1/usage", 200)
    assert (usage["period"], usage["time_zone"]) == ("day", "Europe/Paris")
    current, past = usage["periods"]
    today_id = Calendar("Europe/Paris").period("day", now).period_id
    assert (current["id"], current["held_usd"], current["remaining_usd"]) == (today_id, 0.05, 0.45)
    assert (past["spent_usd"], past["held_usd"]) == (0.07, 0) and "remaining_usd" not in past
    admin.ledger.settle(today.hold_id, 0)
    assert len(admin("GET", "/accounts/usage-1/usage?periods=1", 200)["periods"]) == 1
    (only,) = admin("GET", f"/accounts/usage-1/usage?period={past['id']}", 200)["periods"]
    assert only == past


@pytest.mark.parametrize(
    "method, path, body, status, fragment",
    [
        ("POST", "/accounts", {"account_id": "x", "plan": "gold"}, 400, "no plan 'gold' (plans: free, pro)"),
        ("POST", "/accounts", {"account_id": "bad id", "plan": "pro"}, 422, "String should match pattern"),
        ("POST", "/accounts", {"account_id": "x", "plan": "pro", "budget_usd": 1}, 422, "Extra inputs"),
        ("GET", "/accounts/nobody", None, 404, "no account nobody"),
        ("POST", "/accounts/nobody/keys", {}, 404, "no account nobody"),
        ("POST", "/accounts/nobody/top-up", {"amount_usd": 1}, 404, "no account nobody"),
        ("PATCH", "/accounts/taken", {"status": "deleted"}, 422, "Input should be 'active' or 'suspended'"),
        ("POST", "/accounts/taken/keys", {"policy": "admin"}, 400, "plan free does not allow policy 'admin'"),
        ("POST", "/accounts/taken/keys", {"ttl": "forever"}, 422, "is not a duration"),
        ("POST", "/accounts/taken/top-up", {"amount_usd": -1}, 422, "greater than 0"),
        ("GET", "/keys/nokey", None, 404, "no key nokey"),
    ],
)
def test_bad_requests_are_refused_with_what_is_wrong(admin, method, path, body, status, fragment):
    if admin.ledger.get_account("taken") is None:
        admin("POST", "/accounts", 201, json={"account_id": "taken", "plan": "free"})
    answer = admin(method, path, status, json=body)
    assert fragment in str(answer)


def test_an_account_id_is_taken_once(admin):
    admin("POST", "/accounts", 201, json={"account_id": "once", "plan": "free"})
    assert (
        "already exists"
        in admin("POST", "/accounts", 409, json={"account_id": "once", "plan": "pro"})["error"]["message"]
    )


@pytest.mark.parametrize("token", [None, "wrong", TOKEN[:-1], TOKEN + "x"])
def test_every_route_needs_the_admin_token(admin, token):
    assert admin("GET", "/accounts", 401, token=token)["error"]["type"] == "unauthorized"
    admin("POST", "/accounts", 401, token=token, json={"account_id": "sneaky", "plan": "pro"})
    assert admin.ledger.get_account("sneaky") is None


def test_the_openapi_document_describes_every_route(admin):
    document = requests.get(admin.url + "/openapi.json", timeout=5).json()
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    routes = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert {("POST", "/accounts"), ("PATCH", "/accounts/{account_id}"), ("POST", "/accounts/{account_id}/keys"),
            ("GET", "/accounts/{account_id}/usage"), ("POST", "/keys/{key_id}/revoke")} <= routes  # fmt: skip


# ----- schemathesis: generated requests, bounded so that make test stays fast -----

# A few examples per operation, the same each run, keep make test fast and steady; set more to search wider.
EXAMPLES = int(os.environ.get("AGENTKEYS_ADMIN_EXAMPLES", "6"))
CHECKS = [
    schema_checks.not_a_server_error,
    schema_checks.status_code_conformance,
    schema_checks.response_schema_conformance,
    schema_checks.content_type_conformance,
]


def test_no_generated_request_gets_a_server_error_or_an_undocumented_answer(admin):
    """Every operation of the OpenAPI document, a few generated requests each (valid and not), with the token."""
    schema = schemathesis.openapi.from_url(admin.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, derandomize=EXAMPLES == 6, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def call(case):
            case.call_and_validate(base_url=admin.url, headers=AUTH, checks=CHECKS)

        call()
