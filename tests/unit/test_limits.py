"""Rate limits and the loop breaker in the gate, without mitmproxy: the step before the hold, what its
refusals say, the slot and tokens given back at settlement whatever happens, a child bound by its
parent's limits, and what makes two calls identical."""

import asyncio
import threading
import time
from dataclasses import replace

import pytest
import test_gate
from test_gate import NEVER_SENT, NOW, POLICY, answered, call, chat, run

from agentkeys import credentials
from agentkeys.calls import CallRequest
from agentkeys.gate import Gate
from agentkeys.ledger import KeyRecord, LedgerUnavailable
from agentkeys.limits import request_digest, used_tokens
from agentkeys.money import usd_to_micros
from agentkeys.plans import Plan, PlanFile
from agentkeys.policy import Policy, PolicyFile
from agentkeys.pricing import Usage
from agentkeys.providers.base import DenyKind

env = test_gate.env  # the gate on a SQLite store with a controlled clock


def test_calls_over_the_rpm_are_refused_with_when_to_try_again(env):
    key = env.issue(rate_limits={"requests_per_minute": 2})
    for _ in range(2):
        env.admitted(call(key))
    denial = env.denied(
        call(key), DenyKind.RATE_LIMITED, f"key {credentials.key_id_of(key)} may make 2 requests a minute",
        "(requests_per_minute of policy test)", "try again in 30s",
    )  # fmt: skip
    assert denial.retry_after == pytest.approx(30, abs=0.01)
    env.clock.now += 30
    env.admitted(call(key))


def test_a_rate_limited_call_takes_no_hold(env):
    key = env.issue(rate_limits={"requests_per_minute": 1})
    env.admitted(call(key))
    before = env.balances(key)
    env.denied(call(key), DenyKind.RATE_LIMITED)
    assert env.balances(key) == before


def test_a_key_without_limits_takes_nothing_from_the_store(env):
    assert env.admitted(call(env.issue())).limits is None


def test_concurrent_calls_are_freed_at_settlement(env):
    key = env.issue(rate_limits={"concurrent_calls": 1})
    first = env.admitted(call(key))
    env.denied(call(key), DenyKind.RATE_LIMITED, "may have 1 calls in flight at once")
    run(env.gate.settle(first, answered(Usage(10, 5))))
    env.admitted(call(key))


@pytest.mark.parametrize(
    "end",
    [
        lambda gate, admission: gate.settle(admission, NEVER_SENT),
        lambda gate, admission: gate.settle(admission, answered(None)),
        lambda gate, admission: gate.release(admission),
    ],
    ids=["never-sent", "no-usage", "released"],
)
def test_a_slot_is_freed_however_the_call_ends(env, end):
    key = env.issue(rate_limits={"concurrent_calls": 1})
    run(end(env.gate, env.admitted(call(key))))
    env.admitted(call(key))


def test_a_slot_is_freed_even_when_the_settlement_cannot_be_written(env, monkeypatch):
    key = env.issue(rate_limits={"concurrent_calls": 1})
    admission = env.admitted(call(key))

    async def failing(hold_id, cost):
        raise LedgerUnavailable("the store is down")

    with monkeypatch.context() as patched:
        patched.setattr(env.gate.store, "close_hold", failing)
        with pytest.raises(LedgerUnavailable):
            run(env.gate.settle(admission, answered(Usage(10, 5))))
    env.admitted(call(key))


def test_a_call_refused_after_the_limits_gives_them_back(env):
    """Refused for its budget after it was counted: it never reaches the provider, so it counts for nothing."""
    key = env.issue(budget_usd=0.000001, rate_limits={"requests_per_minute": 1, "concurrent_calls": 1}, max_calls=1)
    for _ in range(3):
        env.denied(call(key), DenyKind.BUDGET)
    assert env.balances(key) == (0, 0)


def test_tokens_count_the_calls_bound_until_it_settles_then_what_it_used(env):
    key = env.issue(rate_limits={"tokens_per_minute": 1000})
    first = env.admitted(call(key, chat(max_tokens=500)))
    assert 500 < first.limits.request.tokens < 1000
    env.denied(call(key, chat(max_tokens=500)), DenyKind.RATE_LIMITED, "may use 1,000 tokens a minute")
    run(env.gate.settle(first, answered(Usage(10, 5))))  # it used 15
    env.admitted(call(key, chat(max_tokens=500)))


def test_a_call_larger_than_a_whole_minutes_tokens_is_told_to_ask_for_less(env):
    key = env.issue(rate_limits={"tokens_per_minute": 100})
    denial = env.denied(call(key, chat(max_tokens=500)), DenyKind.RATE_LIMITED, "lower its max_tokens")
    assert denial.retry_after is None


@pytest.mark.parametrize(
    ("usage_tokens", "charged", "used"),
    [(15, True, 15), (None, True, 700), (None, False, 0), (0, False, 0)],
    ids=["usage", "held-without-usage", "never-charged", "free"],
)
def test_what_a_call_is_counted_for_once_it_ends(usage_tokens, charged, used):
    assert used_tokens(700, usage_tokens, charged) == used


def test_identical_calls_beyond_the_policy_break_the_loop(env):
    key = env.issue(max_identical_calls="2 per 10m")
    env.admitted(call(key))
    env.admitted(call(key, b'{ "messages": [{"content": "Say hi", "role": "user"}],  "model": "gpt-4o-mini"}'))
    denial = env.denied(
        call(key), DenyKind.LOOP, "loop broken", "sent this same request 2 times within 10m",
        "max_identical_calls: 2 per 10m of policy test",
    )  # fmt: skip
    assert denial.retry_after is None
    env.admitted(call(key, chat(messages=[{"role": "user", "content": "Say hello"}])))
    env.clock.now += 601
    env.admitted(call(key))


def test_max_calls_breaks_the_loop_for_good(env):
    key = env.issue(max_calls=2)
    for n in range(2):
        env.admitted(call(key, chat(messages=[{"role": "user", "content": f"call {n}"}])))
    env.clock.now += 3000
    env.denied(call(key), DenyKind.LOOP, "has made all the 2 calls it may make (max_calls: 2 of policy test)")


def test_free_calls_count_as_requests(env):
    key = env.issue(rate_limits={"requests_per_minute": 1})
    env.admitted(call(key, b"", method="GET", path="/v1/models"))
    env.denied(call(key), DenyKind.RATE_LIMITED)


def test_the_file_tightens_the_limits_of_keys_already_issued(env):
    key = env.issue(rate_limits={"requests_per_minute": 10})
    tighter = Policy.model_validate({**POLICY, "rate_limits": {"requests_per_minute": 1}})
    env.gate.policies["test"] = env.gate.limiter.policies["test"] = PolicyFile(tighter, "0123456789ab")
    env.admitted(call(key))
    env.denied(call(key), DenyKind.RATE_LIMITED, "may make 1 requests a minute")


def test_gemini_body_and_path_identify_a_call():
    base = CallRequest("gemini", "POST", "/v1beta/models/gemini-2.5-flash:generateContent", {}, b'{"a": 1, "b": 2}')
    assert request_digest(base) == request_digest(replace(base, body=b'{"b":2,"a":1}'))
    assert request_digest(base) == request_digest(replace(base, query="key=secret"))  # credentials are not the call
    assert request_digest(base) != request_digest(replace(base, path="/v1beta/models/gemini-2.5-pro:generateContent"))
    assert request_digest(base) != request_digest(replace(base, body=b'{"a": 1, "b": 3}'))


def issue_child(env, parent_key: str, **policy_fields) -> str:
    parent_id = credentials.key_id_of(parent_key)
    policy = Policy.model_validate({**POLICY, "name": "child", **policy_fields})
    minted = credentials.mint()
    record = KeyRecord(
        key_id=minted.key_id, key_hash=minted.key_hash, name="child", policy_name=policy.name,
        policy_json=policy.model_dump_json(), created_at=NOW, expires_at=NOW + 600,
        budget_micros=usd_to_micros(0.1), parent_id=parent_id, depth=1,
    )  # fmt: skip
    assert env.ledger.create_child(record, 10, NOW) is None
    return minted.key


def test_a_childs_calls_count_against_its_parents_limits(env):
    parent = env.issue(rate_limits={"requests_per_minute": 2}, max_child_depth=1)
    children = [issue_child(env, parent), issue_child(env, parent)]
    env.admitted(call(children[0]))
    env.admitted(call(children[1]))
    env.denied(call(children[0]), DenyKind.RATE_LIMITED, f"parent key {credentials.key_id_of(parent)}")
    env.denied(call(parent), DenyKind.RATE_LIMITED, f"key {credentials.key_id_of(parent)} may make 2")


def test_many_calls_at_once_never_exceed_the_concurrency_limit(env):
    key = env.issue(rate_limits={"concurrent_calls": 3})

    async def burst():
        return await asyncio.gather(*(test_gate.admit_or_denial(env.gate, call(key)) for _ in range(20)))

    results = run(burst())
    admitted = [result for result in results if not hasattr(result, "kind")]
    assert len(admitted) == 3
    assert all(result.kind is DenyKind.RATE_LIMITED for result in results if hasattr(result, "kind"))


def test_a_call_cancelled_while_its_limits_are_taken_gives_them_back(env, monkeypatch):
    """An agent that goes away while the store answers on a worker thread (which goes on): its slot is
    given back when the answer comes, not left to go stale."""
    key = env.issue(rate_limits={"concurrent_calls": 1})
    store, taking, asked = env.gate.store, env.ledger.take_limits, threading.Event()

    def slow_take(request, now):
        asked.set()
        time.sleep(0.05)
        return taking(request, now)

    async def cancelled_then_again():
        monkeypatch.setattr(store, "_ledger_now", None)  # the store is asked from a worker thread, as Redis is
        monkeypatch.setattr(env.ledger, "take_limits", slow_take)
        admitting = asyncio.ensure_future(env.gate.admit(call(key)))
        while not asked.is_set():  # cancelled once the store is being asked, as an agent hanging up would be
            await asyncio.sleep(0.001)
        admitting.cancel()
        await asyncio.sleep(0.3)  # the store answers; what it took is given back
        return await test_gate.admit_or_denial(env.gate, call(key))

    assert not hasattr(run(cancelled_then_again()), "kind")


def test_bodies_that_are_not_json_objects_are_identified_by_their_bytes():
    get = CallRequest("openai", "GET", "/v1/models", {}, b"")
    assert request_digest(get) == request_digest(replace(get))
    assert request_digest(replace(get, body=b"[1, 2]")) != request_digest(replace(get, body=b"[2, 1]"))
    assert request_digest(replace(get, body=b"\xff\xfe")) != request_digest(get)


def test_a_large_identical_body_is_still_one_loop(env):
    key = env.issue(max_identical_calls="1 per 1h")
    large = chat(messages=[{"role": "user", "content": "x" * 100_000}], max_tokens=5)
    env.admitted(call(key, large))
    env.denied(call(key, large), DenyKind.LOOP)


def test_an_accounts_plan_limits_all_of_its_keys_together(env):
    """Plans give an account limits shared by every key minted for it; a key of no account is not bound."""
    plan = Plan.model_validate(
        {"name": "pro", "budget_usd": 5, "period": "month", "policies": ["agent.policy.yaml"],
         "rate_limits": {"requests_per_minute": 3}}
    )  # fmt: skip
    gate = env.gate
    env.gate = Gate(gate.config, gate.store, gate.prices, gate.policies, {"pro": PlanFile(plan, {}, "r1")})
    account = test_gate.account_of(env, 5.0)  # on plan pro
    first, second = env.issue(account_id=account), env.issue(account_id=account)
    for key in (first, second, first):
        env.admitted(call(key))
    env.denied(
        call(second), DenyKind.RATE_LIMITED, "account acme may make 3 requests a minute", "of plan pro", "try again in"
    )
    env.admitted(call(env.issue()))
    env.clock.now += 20  # a third of a minute: one request's worth back
    env.admitted(call(second))
    env.denied(call(first), DenyKind.RATE_LIMITED, "account acme")
