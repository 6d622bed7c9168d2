"""The gate without mitmproxy: request facts in, a decision out; usage in, a settlement out. For every
format, the hold never falls below what the provider bills; clamping, unmetered endpoints, unseen input."""

import asyncio
import base64
import dataclasses
import json
import threading
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkeys import credentials
from agentkeys.calls import CallRequest, Denial, Outcome
from agentkeys.gate import Admission, Gate, Settlement, charge_for
from agentkeys.ledger import KeyRecord, LedgerBusy, LedgerUnavailable, SqliteLedger
from agentkeys.money import format_usd, usd_to_micros
from agentkeys.policy import Policy, ProxyConfig
from agentkeys.pricing import PriceTable, Usage, cost_micros
from agentkeys.providers import FORMATS
from agentkeys.providers.anthropic import IMAGE_TOKEN_ALLOWANCE as ANTHROPIC_IMAGE_ALLOWANCE
from agentkeys.providers.base import DenyKind, StreamResult
from agentkeys.store import Store
from mock_provider import count_o200k_tokens
from mock_provider.anthropic import Messages
from mock_provider.gemini import GenerateContent
from mock_provider.openai import Chat, Completions, Embeddings, Responses

OPENAI_REAL_KEY = "sk-real-openai-0123456789"
ANTHROPIC_REAL_KEY = "sk-ant-real-0123456789"
NOW = 1_700_000_000.0
PRICES = PriceTable.bundled()
MINI = PRICES.lookup("openai", "gpt-4o-mini")
HAIKU = PRICES.lookup("anthropic", "claude-haiku-4-5")
REAL_KEYS = {
    "OPENAI_API_KEY": OPENAI_REAL_KEY,
    "ANTHROPIC_API_KEY": ANTHROPIC_REAL_KEY,
    "GEMINI_API_KEY": "real-gemini-0123456789",
    "AZURE_OPENAI_API_KEY": "real-azure-0123456789",
}
AZURE_PROVIDER = {
    "format": "azure",
    "upstream": "https://myres.openai.azure.com",
    "key_env": "AZURE_OPENAI_API_KEY",
    "deployments": {"prod-mini": "gpt-4o-mini"},
}
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
POLICY = {
    "name": "test",
    "budget_usd": 1.0,
    "providers": ["openai", "anthropic"],
    "endpoints": ["POST /v1/chat/completions", "POST /v1/messages", "GET /v1/models"],
    "models": ["gpt-4o-mini*", "claude-haiku-4-5*"],
    "default_max_output_tokens": 256,
}
ANY_CALL = {"providers": ["openai", "anthropic", "gemini", "azure"], "endpoints": ["* /**"], "models": ["*"]}


class Clock:
    def __init__(self):
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    gate: Gate
    ledger: SqliteLedger
    clock: Clock

    def issue(self, budget_usd: float = 1.0, ttl: int = 3600, **policy_fields) -> str:
        """A new scoped key under POLICY (with `policy_fields` changed); returns the key itself."""
        policy = Policy.model_validate({**POLICY, **policy_fields})
        minted = credentials.mint()
        self.ledger.create_key(
            KeyRecord(
                key_id=minted.key_id, key_hash=minted.key_hash, name="test", policy_name=policy.name,
                policy_json=policy.model_dump_json(), created_at=self.clock.now,
                expires_at=self.clock.now + ttl, budget_micros=usd_to_micros(budget_usd),
            )
        )  # fmt: skip
        return minted.key

    def issue_any(self, budget_usd: float = 1.0, **policy_fields) -> str:
        """A new key whose policy allows any call to any format (with `policy_fields` changed)."""
        return self.issue(budget_usd, **{**ANY_CALL, **policy_fields})

    def balances(self, key: str) -> tuple[int, int]:
        record = self.ledger.get_key(credentials.key_id_of(key))
        return record.spent_micros, record.held_micros

    def admit(self, call: CallRequest) -> Admission | Denial:
        return asyncio.run(admit_or_denial(self.gate, call))

    def admitted(self, call: CallRequest) -> Admission:
        result = self.admit(call)
        assert isinstance(result, Admission), result
        return result

    def denied(self, call: CallRequest, kind: DenyKind, *fragments: str) -> Denial:
        result = self.admit(call)
        assert isinstance(result, Denial), result
        assert result.kind is kind, result
        for fragment in fragments:
            assert fragment in result.message, result.message
        return result


def make_env(tmp_path, monkeypatch, ledger_class=SqliteLedger) -> Env:
    for name, value in REAL_KEYS.items():
        monkeypatch.setenv(name, value)
    ledger, clock = ledger_class(tmp_path / "gate.db"), Clock()
    config = ProxyConfig.model_validate({"providers": {"azure": AZURE_PROVIDER}})
    return Env(Gate(config, Store(ledger, clock), PriceTable.bundled()), ledger, clock)


async def admit_or_denial(gate: Gate, call: CallRequest) -> Admission | Denial:
    try:
        return await gate.admit(call)
    except Denial as denial:
        return denial


def answered(usage: Usage | None = None, stream: StreamResult | None = None) -> Outcome:
    """A call the provider answered in full, with this usage (or stream)."""
    return Outcome(reached_provider=True, complete=True, status=200, usage=usage, stream=stream)


NEVER_SENT = Outcome(reached_provider=False, complete=False)


@pytest.fixture
def env(tmp_path, monkeypatch):
    made = make_env(tmp_path, monkeypatch)
    yield made
    made.ledger.close()


def chat(**fields) -> bytes:
    return json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}], **fields}).encode()


def messages(**fields) -> bytes:
    body = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "Say hi"}]}
    return json.dumps({**body, **fields}).encode()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def call(key: str | None = None, body: bytes | None = None, provider: str = "openai", **fields) -> CallRequest:
    fields.setdefault("headers", bearer(key) if key else {})
    fields.setdefault("method", "POST")
    fields.setdefault("path", PATHS[provider])
    if body is None:
        body = chat() if provider == "openai" else messages()
    return CallRequest(provider=provider, body=body, **fields)


def request(
    key: str, provider: str, path: str, body: dict | bytes, method: str = "POST", query: str = ""
) -> CallRequest:
    """A call to any format's endpoint, its body as JSON or as the bytes sent."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return CallRequest(provider, method, path, bearer(key), raw, query=query)


def run(coroutine):
    return asyncio.run(coroutine)


# ----- identify and authenticate -----


def wrong_secret(key: str) -> str:
    return f"ak_{credentials.key_id_of(key)}_{'x' * 43}"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (lambda key, other: {}, "no agent key"),
        (lambda key, other: {"authorization": "Basic abc"}, "no agent key"),
        (lambda key, other: bearer(OPENAI_REAL_KEY), "real provider key"),
        (lambda key, other: {**bearer(key), "x-api-key": ANTHROPIC_REAL_KEY}, "real provider key"),
        (lambda key, other: {**bearer(key), "x-api-key": other}, "two different agent keys"),
        (lambda key, other: bearer(credentials.mint().key), "unknown agent key"),
        (lambda key, other: bearer(wrong_secret(key)), "unknown agent key"),
    ],
    ids=["none", "not-bearer", "real-key", "real-key-beside-scoped", "two-keys", "unknown", "wrong-secret"],
)
def test_requests_without_exactly_one_valid_key_are_unauthenticated(env, headers, message):
    key, other = env.issue(), env.issue()
    env.denied(call(headers=headers(key, other)), DenyKind.UNAUTHENTICATED, message)
    assert env.balances(key) == (0, 0)


def proxy_basic(key: str) -> dict[str, str]:
    return {"proxy-authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


@pytest.mark.parametrize(
    "where",
    [
        lambda key: {"headers": bearer(key)},
        lambda key: {"headers": {"x-api-key": key}},
        lambda key: {"headers": {"api-key": key}},
        lambda key: {"headers": proxy_basic(key)},
        lambda key: {"headers": {}, "tunnel_credential": key},
        lambda key: {"headers": {**bearer(key), "x-api-key": key}, "tunnel_credential": key},  # same key twice
    ],
    ids=["bearer", "x-api-key", "api-key", "proxy-authorization", "tunnel", "same-key-everywhere"],
)
def test_the_key_is_accepted_wherever_sdks_send_it(env, where):
    key = env.issue()
    admission = env.admitted(call(**where(key)))
    assert admission.key.key_id == credentials.key_id_of(key)
    assert admission.real_key == OPENAI_REAL_KEY


@pytest.mark.parametrize(
    ("change", "status"),
    [
        (lambda env, key: setattr(env.clock, "now", NOW + 3600), "expired"),
        (lambda env, key: env.ledger.revoke(credentials.key_id_of(key), NOW), "revoked"),
    ],
    ids=["expired", "revoked"],
)
def test_expired_and_revoked_keys_are_unauthenticated(env, change, status):
    key = env.issue(ttl=3600)
    env.clock.now = NOW + 3599
    env.admitted(call(key))
    change(env, key)
    env.denied(call(key), DenyKind.UNAUTHENTICATED, f"is {status}")


# ----- authorize -----


@pytest.mark.parametrize(
    ("policy", "request_fields", "fragments"),
    [
        (
            {"providers": ["openai"]},
            {"provider": "anthropic"},
            ["provider anthropic is not allowed", "(allowed: openai)"],
        ),
        (
            {"endpoints": ["POST /v1/chat/completions"]},
            {"method": "GET", "path": "/v1/models", "body": b""},
            ["endpoint GET /v1/models is not allowed", "(allowed: POST /v1/chat/completions)"],
        ),
        (
            {"endpoints": ["* /v1/**"]},
            {"path": "/v1/audio/speech", "body": b'{"model": "tts-1", "input": "x", "voice": "alloy"}'},
            ["POST /v1/audio/speech cannot be metered"],
        ),
        (
            {},
            {"body": chat(model="gpt-4o")},
            ["model gpt-4o is not allowed", "(allowed: gpt-4o-mini*)"],
        ),
        ({"models": ["gpt-*"]}, {"body": chat(model="gpt-unknown-9")}, ["no price is known for model gpt-unknown-9"]),
    ],
    ids=["provider", "endpoint", "unmeterable-endpoint", "model", "unknown-price"],
)
def test_calls_outside_the_policy_are_forbidden(env, policy, request_fields, fragments):
    key = env.issue(**policy)
    env.denied(call(key, **request_fields), DenyKind.FORBIDDEN, *fragments)
    assert env.balances(key) == (0, 0)


@pytest.mark.parametrize(
    ("provider", "body", "fragment"),
    [
        ("openai", b"{not json", "not valid JSON"),
        ("openai", b"[1, 2]", "must be a JSON object"),
        ("openai", b'{"messages": [{"role": "user", "content": "x"}]}', "no 'model'"),
        ("openai", chat(messages=[]), "'messages' must be a non-empty list"),
        ("openai", chat(max_tokens=-5), "'max_tokens' must be a positive integer"),
        (
            "anthropic",
            json.dumps({"model": "claude-haiku-4-5", "messages": [{"role": "user"}]}).encode(),
            "'max_tokens' is required",
        ),
        ("anthropic", messages(max_tokens="lots"), "'max_tokens' must be a positive integer"),
    ],
    ids=["bad-json", "not-object", "no-model", "no-messages", "negative-max", "anthropic-no-max", "anthropic-bad-max"],
)
def test_unreadable_metered_requests_are_bad_requests(env, provider, body, fragment):
    key = env.issue()
    env.denied(call(key, body, provider), DenyKind.BAD_REQUEST, fragment)
    assert env.balances(key) == (0, 0)


def test_free_endpoints_are_forwarded_without_a_hold(env):
    key = env.issue()
    admission = env.admitted(call(key, b"", method="GET", path="/v1/models"))
    assert (admission.facts.metered, admission.hold_id, admission.upstream_body) == (False, None, None)
    assert run(env.gate.settle(admission, answered())).cost_micros == 0
    assert env.balances(key) == (0, 0)


def test_a_provider_without_a_real_key_is_the_operators_to_fix(env, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    env.gate = Gate(ProxyConfig(), Store(env.ledger, env.clock), PRICES)  # real keys are read at start
    env.denied(call(env.issue(), provider="anthropic"), DenyKind.NOT_CONFIGURED, "must set ANTHROPIC_API_KEY")


# ----- price and reserve -----


def test_a_call_that_might_not_fit_the_budget_is_refused(env):
    key = env.issue(budget_usd=0.0001)
    denial = env.denied(call(key), DenyKind.BUDGET, "budget exhausted", "could cost up to $", "$0.0001 remains")
    assert denial.model == "gpt-4o-mini"
    assert env.balances(key) == (0, 0)


def test_the_budget_message_counts_calls_in_flight(env):
    key = env.issue(budget_usd=0.001)
    first = env.admitted(call(key, chat(max_tokens=1000)))  # holds about $0.0006
    remains = f"{format_usd(1000 - first.hold_micros)} remains"
    env.denied(call(key, chat(max_tokens=1000)), DenyKind.BUDGET, remains)


def expected_hold(provider: str, body: bytes, max_output: int) -> int:
    facts = FORMATS[provider].request_facts("POST", PATHS[provider], body)
    price = PRICES.lookup(provider, facts.model)
    return cost_micros(price, Usage(input_tokens=facts.input_token_bound, output_tokens=max_output))


@pytest.mark.parametrize(
    ("provider", "body", "max_output"),
    [
        ("openai", chat(max_tokens=100), 100),
        ("openai", chat(max_completion_tokens=50, max_tokens=999), 50),
        ("openai", chat(), 256),  # the policy's default
        ("anthropic", messages(max_tokens=300), 300),
    ],
    ids=["openai-max_tokens", "openai-max_completion_tokens", "openai-policy-default", "anthropic"],
)
def test_the_hold_is_the_worst_case_and_is_reserved(env, provider, body, max_output):
    key = env.issue()
    admission = env.admitted(call(key, body, provider))
    assert admission.hold_micros == expected_hold(provider, body, max_output) > 0
    assert admission.remaining_micros == 1_000_000 - admission.hold_micros
    assert env.balances(key) == (0, admission.hold_micros)


def test_without_any_limit_the_hold_assumes_the_models_maximum_output(env):
    key = env.issue(default_max_output_tokens=None)
    admission = env.admitted(call(key, chat()))
    assert admission.hold_micros == expected_hold("openai", chat(), MINI.max_output_tokens)
    assert admission.upstream_body is None  # the provider's own limit already bounds the call


def upstream_json(admission: Admission) -> dict:
    assert admission.upstream_body is not None
    return json.loads(admission.upstream_body)


def test_the_policy_default_output_cap_is_sent_upstream(env):
    key = env.issue(default_max_output_tokens=256)
    sent = upstream_json(env.admitted(call(key, chat(temperature=0.2))))
    assert sent["max_completion_tokens"] == 256
    assert (sent["model"], sent["temperature"], sent["messages"]) == (
        "gpt-4o-mini",
        0.2,
        json.loads(chat())["messages"],
    )


def test_a_client_cap_is_forwarded_unchanged(env):
    admission = env.admitted(call(env.issue(), chat(max_tokens=40)))
    assert admission.upstream_body is None


def test_an_openai_stream_is_asked_for_usage_on_the_clients_behalf(env):
    key = env.issue()
    admission = env.admitted(call(key, chat(stream=True, max_tokens=10, stream_options={"other": 1})))
    assert upstream_json(admission)["stream_options"] == {"other": 1, "include_usage": True}
    assert admission.facts.client_wants_stream_usage is False
    assert admission.wire.stream_meter(admission.facts).hide_usage_chunk is True


def test_an_openai_stream_that_asks_for_usage_is_left_alone(env):
    body = chat(stream=True, max_tokens=10, stream_options={"include_usage": True})
    admission = env.admitted(call(env.issue(), body))
    assert admission.upstream_body is None
    assert admission.wire.stream_meter(admission.facts).hide_usage_chunk is False


# ----- settle -----


@pytest.fixture
def admission_and_key(env):
    key = env.issue()
    return env.admitted(call(key, chat(max_tokens=1000))), key


def test_settle_usage_charges_the_exact_cost_and_frees_the_rest(env, admission_and_key):
    admission, key = admission_and_key
    usage = Usage(input_tokens=12, output_tokens=34)
    settlement = run(env.gate.settle(admission, answered(usage)))
    assert (settlement.cost_micros, settlement.metering, settlement.usage) == (cost_micros(MINI, usage), "usage", usage)
    assert 0 < settlement.cost_micros < admission.hold_micros
    assert env.balances(key) == (settlement.cost_micros, 0)


def test_settle_without_usage_charges_the_full_hold(env, admission_and_key):
    admission, key = admission_and_key
    settlement = run(env.gate.settle(admission, answered()))
    assert (settlement.cost_micros, settlement.metering) == (admission.hold_micros, "held")
    assert env.balances(key) == (admission.hold_micros, 0)


@pytest.mark.parametrize("complete", [False, True], ids=["cut", "ended-without-usage"])
def test_a_stream_without_the_providers_usage_is_charged_its_full_hold(env, admission_and_key, complete):
    """What was visible is no measure of what the provider bills (reasoning tokens are invisible)."""
    admission, key = admission_and_key
    result = StreamResult(usage=None, complete=complete)
    outcome = Outcome(reached_provider=True, complete=complete, status=200, stream=result)
    settlement = run(env.gate.settle(admission, outcome))
    assert (settlement.cost_micros, settlement.metering) == (admission.hold_micros, "held")
    assert "full hold" in settlement.why
    assert env.balances(key) == (admission.hold_micros, 0)


def test_a_complete_stream_is_charged_its_usage(env, admission_and_key):
    admission, key = admission_and_key
    usage = Usage(input_tokens=9, output_tokens=3)
    settlement = run(env.gate.settle(admission, answered(stream=StreamResult(usage, True, "hi"))))
    assert (settlement.cost_micros, settlement.metering) == (cost_micros(MINI, usage), "usage")


def test_a_call_that_never_reached_the_provider_is_charged_nothing(env, admission_and_key):
    admission, key = admission_and_key
    settlement = run(env.gate.settle(admission, NEVER_SENT))
    assert (settlement.cost_micros, settlement.metering) == (0, "none")
    assert env.balances(key) == (0, 0)


@pytest.mark.parametrize(
    "again",
    [
        lambda gate, a: gate.settle(a, answered()),
        lambda gate, a: gate.settle(a, answered(Usage(input_tokens=999, output_tokens=999))),
        lambda gate, a: gate.settle(a, NEVER_SENT),
        lambda gate, a: gate.settle(a, answered(stream=StreamResult(None, False, "more text"))),
    ],
    ids=["full-hold", "usage", "release", "stream"],
)
def test_settling_twice_charges_once(env, admission_and_key, again):
    admission, key = admission_and_key
    first = run(env.gate.settle(admission, answered(Usage(input_tokens=10, output_tokens=10))))
    assert run(again(env.gate, admission)).cost_micros == 0
    assert env.balances(key) == (first.cost_micros, 0)


# ----- the store is down -----


def failing_ledger(*methods: str, times: int = 10**9):
    """A SqliteLedger whose `methods` raise LedgerUnavailable (the first `times` calls)."""
    failures = {"left": times}

    def unavailable(name):
        real = getattr(SqliteLedger, name)

        def method(self, *args):
            if failures["left"] > 0:
                failures["left"] -= 1
                raise LedgerUnavailable("database is locked")
            return real(self, *args)

        return method

    return type("FailingLedger", (SqliteLedger,), {name: unavailable(name) for name in methods})


@pytest.mark.parametrize("method", ["get_key", "reserve"])
def test_an_unavailable_store_refuses_the_call(tmp_path, monkeypatch, method):
    env = make_env(tmp_path, monkeypatch, failing_ledger(method))
    env.denied(call(env.issue()), DenyKind.UNAVAILABLE, "key store is unavailable")
    env.ledger.close()


def test_a_settlement_that_failed_is_retried_with_the_real_charge(tmp_path, monkeypatch):
    env = make_env(tmp_path, monkeypatch, failing_ledger("settle_many", times=1))
    key = env.issue()
    admission = env.admitted(call(key))
    usage = Usage(input_tokens=5, output_tokens=5)
    settled = run(env.gate.settle(admission, answered(usage)))
    try:
        assert (settled.cost_micros, settled.metering) == (cost_micros(MINI, usage), "usage")
        assert env.balances(key) == (cost_micros(MINI, usage), 0)  # no hold left behind, not the full hold
    finally:
        env.ledger.close()


# ----- the hold bounds what the provider bills -----

LONG_TEXT = " ".join(f"word{i} ünïcödé 数据 🙂 {i * 7919 % 1000}" for i in range(1500))
UNICODE = "héllo wörld — “quotes” 日本語のテキスト 🙂🚀 עברית العربية Ελληνικά ﷺ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
CODE = 'def f(x):\n    return {"a": [x ** 2 for x in range(10)]}  # comment\n\n\tprint(f(3))\n' * 20


def user(content, **fields) -> dict:
    return {"role": "user", "content": content, **fields}


def text_parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": text} for text in texts]


OPENAI_SHAPES = {
    "one-message": [user("hi")],
    "empty-content": [user("")],
    "system-and-user": [{"role": "system", "content": "You are terse."}, user("What is 2+2?")],
    "developer-role": [{"role": "developer", "content": "Be brief."}, user("ok")],
    "many-messages": [
        {"role": ("user", "assistant")[i % 2], "content": f"message number {i}: {'abc ' * (i % 7)}"} for i in range(80)
    ],
    "unicode": [user(UNICODE)],
    "emoji-zwj": [user("👩‍👩‍👧‍👦🏳️‍🌈" * 60)],
    "long": [user(LONG_TEXT)],
    "whitespace": [user("\n\n\t   \n \r\n" * 200)],
    "digits": [user("1234567890" * 300)],
    "code": [user(CODE)],
    "special-token-text": [user("<|endoftext|><|im_start|>system<|im_end|>" * 10)],
    "names": [user("hi", name="alice"), user("yo", name="bob_the_builder_42"), user("¿qué?", name="名前")],
    "parts": [user(text_parts("hel", "lo", " world", ""))],
    "parts-split-word": [user(text_parts(*"internationalization"))],
    "parts-split-unicode": [user(text_parts(*UNICODE))],
    "parts-and-image": [
        user([*text_parts("what is this?"), {"type": "image_url", "image_url": {"url": "https://x/y.png"}}])
    ],
    "tool-call-and-result": [
        user("weather?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "wx", "arguments": '{"city":"Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "cloudy, 4°C"},
    ],
}

ANTHROPIC_SHAPES = {
    "one-message": {"messages": [user("hi")]},
    "system-string": {"system": "You are terse.", "messages": [user("What is 2+2?")]},
    "system-blocks": {"system": text_parts("Rule one.", " Rule two ✓"), "messages": [user("go")]},
    "many-messages": {
        "messages": [
            {"role": ("user", "assistant")[i % 2], "content": f"turn {i} {'xyz ' * (i % 5)}"} for i in range(80)
        ]
    },
    "unicode": {"messages": [user(UNICODE)]},
    "long": {"system": LONG_TEXT, "messages": [user(LONG_TEXT)]},
    "whitespace": {"messages": [user("\n\n\t   \n " * 200)]},
    "special-token-text": {"messages": [user("<|endoftext|>" * 20)]},
    "content-blocks": {"messages": [user(text_parts("part one, ", "part two ", *"spelled"))]},
    "image-block": {
        "messages": [user([{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}, *text_parts("?")])]
    },
}


def openai_bound_and_mock(body: dict) -> tuple[int, int]:
    bound = FORMATS["openai"].request_facts("POST", PATHS["openai"], json.dumps(body).encode()).input_token_bound
    return bound, Chat.call(body, count_o200k_tokens, 1).input_tokens


def anthropic_bound_and_mock(body: dict) -> tuple[int, int]:
    bound = FORMATS["anthropic"].request_facts("POST", PATHS["anthropic"], json.dumps(body).encode()).input_token_bound
    return bound, Messages.call(body, count_o200k_tokens, 1).input_tokens


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4.1-mini"])
@pytest.mark.parametrize("shape", sorted(OPENAI_SHAPES))
def test_openai_input_bound_covers_what_the_provider_counts(shape, model):
    bound, counted = openai_bound_and_mock({"model": model, "messages": OPENAI_SHAPES[shape]})
    assert bound >= counted


@pytest.mark.parametrize("shape", sorted(ANTHROPIC_SHAPES))
def test_anthropic_input_bound_covers_what_the_provider_counts(shape):
    bound, counted = anthropic_bound_and_mock(
        {"model": "claude-haiku-4-5", "max_tokens": 10, **ANTHROPIC_SHAPES[shape]}
    )
    assert bound >= counted


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=25), min_size=1, max_size=8), st.text(max_size=10))
def test_openai_input_bound_covers_any_split_of_text_into_parts(parts, name):
    message = user(text_parts(*parts), **({"name": name} if name else {}))
    bound, counted = openai_bound_and_mock({"model": "gpt-4o-mini", "messages": [message]})
    assert bound >= counted


@pytest.mark.parametrize(
    ("provider", "body", "max_output"),
    [
        ("openai", chat(messages=OPENAI_SHAPES["long"], max_tokens=700), 700),
        ("openai", chat(messages=OPENAI_SHAPES["names"]), 256),
        ("anthropic", messages(max_tokens=500, **ANTHROPIC_SHAPES["long"]), 500),
    ],
)
def test_the_hold_covers_the_usage_the_provider_reports(env, provider, body, max_output):
    """The mock's own bill for this request, at the longest reply allowed, fits within the hold."""
    api = {"openai": Chat, "anthropic": Messages}[provider]
    admission = env.admitted(call(env.issue(), body, provider))
    billed = api.call(json.loads(admission.upstream_body or body), count_o200k_tokens, 10**6)
    assert billed.output_tokens == max_output
    usage = Usage(input_tokens=billed.input_tokens, output_tokens=billed.output_tokens)
    assert cost_micros(admission.price, usage) <= admission.hold_micros


def test_the_hold_covers_every_requested_choice(env):
    admission = env.admitted(call(env.issue(), chat(max_tokens=100, n=3)))
    assert admission.hold_micros >= expected_hold("openai", chat(max_tokens=100, n=3), 3 * 100)


def test_an_image_inside_a_tool_result_gets_the_image_allowance():
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/screenshot.png"}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [image]}
    body = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [user([result])]}
    bound, _ = anthropic_bound_and_mock(body)
    assert bound >= ANTHROPIC_IMAGE_ALLOWANCE


@pytest.mark.parametrize(
    ("provider", "content"),
    [
        ("anthropic", {"type": "document", "source": {"type": "url", "url": "https://example.com/paper.pdf"}}),
        ("anthropic", {"type": "document", "source": {"type": "file", "file_id": "file_011abc"}}),
        ("openai", {"type": "file", "file": {"file_id": "file-abc123"}}),
    ],
    ids=["anthropic-pdf-url", "anthropic-file-id", "openai-file-id"],
)
def test_documents_by_reference_are_not_admitted_at_a_few_tokens(env, provider, content):
    body = chat(messages=[user([content])]) if provider == "openai" else messages(messages=[user([content])])
    result = env.admit(call(env.issue(), body, provider))
    assert isinstance(result, Denial) or result.facts.input_token_bound >= 100_000


def test_a_busy_store_is_waited_for_off_the_event_loop(tmp_path, monkeypatch):
    """The on-loop handle gives up at once when another writer holds the lock; the worker then waits."""
    worker_threads = set()

    class BusyNow(SqliteLedger):
        def nonblocking(self):
            handle = super().nonblocking()
            handle.reserve = lambda *args: (_ for _ in ()).throw(LedgerBusy("database is locked"))
            return handle

        def reserve(self, *args):
            worker_threads.add(threading.current_thread().name)
            return super().reserve(*args)

    env = make_env(tmp_path, monkeypatch, BusyNow)
    admission = env.admitted(call(env.issue()))
    assert admission.hold_id is not None
    assert worker_threads and all(name.startswith("agentkeys-ledger") for name in worker_threads)
    env.ledger.close()


def test_holds_and_settlements_asked_for_in_one_turn_of_the_loop_are_written_together(tmp_path, monkeypatch):
    """Calls under load arrive and finish in bunches: one write to the store for each bunch. A call
    with no other in flight is written at once."""
    writes = []

    class Counting(SqliteLedger):
        def nonblocking(self):
            handle = super().nonblocking()
            for name in ("reserve_many", "settle_many"):
                real = getattr(handle, name)
                setattr(
                    handle, name, lambda batch, name=name, real=real: writes.append((name, len(batch))) or real(batch)
                )
            return handle

    env = make_env(tmp_path, monkeypatch, Counting)
    key = env.issue()

    async def one_call_then_three_at_once():
        first = await env.gate.admit(call(key))
        admissions = [first, *await asyncio.gather(*(env.gate.admit(call(key)) for _ in range(3)))]
        usage = Usage(input_tokens=5, output_tokens=5)
        return admissions, await asyncio.gather(*(env.gate.settle(a, answered(usage)) for a in admissions))

    admissions, settlements = run(one_call_then_three_at_once())
    assert len({admission.hold_id for admission in admissions}) == 4
    assert writes == [("reserve_many", 1), ("reserve_many", 3), ("settle_many", 4)]
    assert env.balances(key) == (sum(settlement.cost_micros for settlement in settlements), 0)
    env.ledger.close()


def test_a_call_cancelled_while_its_hold_is_written_leaves_nothing_held(env):
    """It never reaches the provider, so the hold written for it in its batch is freed at once."""
    key = env.issue()

    async def three_at_once_one_cancelled():
        in_flight = await env.gate.admit(call(key))  # one call in flight: the next three are batched
        calls = [asyncio.ensure_future(env.gate.admit(call(key))) for _ in range(3)]
        await asyncio.sleep(0)  # all three wait for the next turn's write
        calls[0].cancel()
        admissions = await asyncio.gather(*calls[1:])
        await asyncio.sleep(0.01)  # the cancelled call's hold is freed by the batch's own task
        for admission in (in_flight, *admissions):
            await env.gate.release(admission)
        return calls[0]

    cancelled = run(three_at_once_one_cancelled())
    assert cancelled.cancelled()
    assert env.balances(key) == (0, 0)


def test_a_swept_hold_no_longer_counts_as_a_call_in_flight(env):
    key = env.issue()
    admission = env.admitted(call(key))
    assert env.gate.store.open_holds == {admission.hold_id}
    env.clock.now += env.gate.config.stale_hold_after + 1
    swept = run(env.gate.store.sweep_stale_holds(env.gate.config.stale_hold_after))
    assert [hold.hold_id for hold in swept] == [admission.hold_id]
    assert env.gate.store.open_holds == set()
    assert env.balances(key) == (admission.hold_micros, 0)


def test_a_long_prompt_is_held_at_its_bytes_and_counted_exactly_only_when_that_does_not_fit(env):
    """Counting 400 KB exactly costs milliseconds; bytes bound it in microseconds, at a larger hold."""
    body = chat(messages=[user("hello " * 20_000)], max_tokens=10)
    exact = FORMATS["openai"].request_facts("POST", PATHS["openai"], body, exact=True)
    price = PRICES.lookup("openai", "gpt-4o-mini")
    exact_hold = cost_micros(price, Usage(input_tokens=exact.input_token_bound, output_tokens=10))

    roomy = env.admitted(call(env.issue(budget_usd=1.0), body))
    assert roomy.facts.input_token_bound >= len("hello " * 20_000) > exact.input_token_bound

    tight = env.admitted(call(env.issue(budget_usd=(exact_hold + 5) / 1e6), body))
    assert tight.facts.input_token_bound == exact.input_token_bound and tight.hold_micros == exact_hold
    env.denied(call(env.issue(budget_usd=(exact_hold - 5) / 1e6), body), DenyKind.BUDGET, "could cost up to")


# ----- the settlement rules, as a table -----


def metered_admission(hold_micros: int = 1_000) -> Admission:
    return Admission(
        key=None, policy=None, wire=FORMATS["openai"], facts=None, real_key="sk", metering="metered",
        remaining_micros=0, price=MINI, hold_id=1, hold_micros=hold_micros,
    )  # fmt: skip


SMALL = Usage(input_tokens=100, output_tokens=50)


def cut_stream(result: StreamResult) -> Outcome:
    return Outcome(reached_provider=True, complete=False, status=200, stream=result)


@pytest.mark.parametrize(
    ("outcome", "cost", "metering"),
    [
        (NEVER_SENT, 0, "none"),
        (Outcome(reached_provider=True, complete=True, status=429), 0, "none"),
        (Outcome(reached_provider=True, complete=False, status=500), 0, "none"),
        (answered(SMALL), cost_micros(MINI, SMALL), "usage"),
        (answered(), 1_000, "held"),
        (Outcome(reached_provider=True, complete=False), 1_000, "held"),
        (Outcome(reached_provider=True, complete=False, status=200), 1_000, "held"),
        (cut_stream(StreamResult(None, False, "Hi")), 1_000, "held"),
        (cut_stream(StreamResult(SMALL, False, "")), cost_micros(MINI, SMALL), "usage"),
        (Outcome(True, True, 200, stream=StreamResult(SMALL, True, ""), meter_broken=True), 1_000, "held"),
    ],
    ids=["never-sent", "429", "cut-500", "usage", "no-usage", "cut-before-headers", "cut-after-headers", "stream-cut",
         "stream-cut-after-usage", "meter-broken"],
)  # fmt: skip
def test_each_settlement_rule(outcome, cost, metering):
    charge = charge_for(metered_admission(), outcome)
    assert (charge.cost_micros, charge.metering) == (cost, metering)


def test_usage_above_the_hold_is_charged_in_full_as_an_overrun():
    """The provider spent it (it ignored the output limit), so the budget pays it; the audit says so."""
    big = Usage(input_tokens=10_000, output_tokens=10_000)
    charge = charge_for(metered_admission(hold_micros=10), answered(big))
    assert (charge.cost_micros, charge.metering) == (cost_micros(MINI, big), "overrun")
    assert charge.cost_micros > 10 and "more than the call's hold" in charge.why


@pytest.mark.parametrize("metering", ["free", "unmetered"])
def test_calls_without_a_hold_are_charged_nothing(metering):
    admission = dataclasses.replace(metered_admission(), metering=metering, hold_id=None, hold_micros=0)
    assert charge_for(admission, answered(SMALL)) == Settlement(0, metering)


@given(
    reached=st.booleans(),
    complete=st.booleans(),
    status=st.sampled_from([None, 200, 400, 429, 500]),
    reported=st.sampled_from(["body", "stream", "none"]),
    meter_broken=st.booleans(),
    input_tokens=st.integers(0, 2_000),
    output_tokens=st.integers(0, 500),
)
@settings(max_examples=300, deadline=None)
def test_the_charge_is_never_below_what_the_provider_bills(
    reached, complete, status, reported, meter_broken, input_tokens, output_tokens
):
    """Whatever the client did and however far the response got, the proxy charges at least the bill.

    The provider bills a call it received and did not refuse; the proxy sees the usage only if the
    provider reported it (in the body of a complete response, or in a stream's usage event)."""
    true_usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    hold = cost_micros(MINI, Usage(input_tokens=2_000, output_tokens=500))
    billed = cost_micros(MINI, true_usage) if reached and (status is None or status < 400) else 0
    seen = true_usage if reported != "none" and (complete or reported == "stream") else None
    outcome = Outcome(
        reached_provider=reached, complete=complete, status=status, meter_broken=meter_broken,
        usage=seen if reported == "body" else None,
        stream=StreamResult(seen, complete, "") if reported == "stream" else None,
    )  # fmt: skip
    charge = charge_for(metered_admission(hold_micros=hold), outcome)
    assert charge.cost_micros >= billed
    assert charge.cost_micros <= hold  # and never more than the hold, while the provider keeps to it


def test_a_failure_after_the_hold_frees_it_at_once(env, monkeypatch):
    """The body is rewritten under the hold when the budget lowers the output limit; if that fails, the
    call is not forwarded and nothing stays held for the sweeper to charge."""
    key = env.issue(budget_usd=0.00005, clamp_max_tokens=True)
    wire = FORMATS["openai"]
    real = wire.upstream_body

    def fails_when_clamped(facts, body, cap):
        if cap is not None and cap < 256:
            raise RuntimeError("a bug while writing the clamped body")
        return real(facts, body, cap)

    monkeypatch.setattr(wire, "upstream_body", fails_when_clamped)
    with pytest.raises(RuntimeError):
        env.admit(call(key, chat()))
    assert env.balances(key) == (0, 0)
    assert env.gate.store.open_holds == set()


@pytest.mark.parametrize(
    ("asked", "sent"),
    [(64_000, 1_000), (None, 1_000), (500, None)],
    ids=["framework-default-above", "none-asked-model-limit-above", "below-the-ceiling"],
)
def test_the_policys_output_ceiling_lowers_larger_limits(env, asked, sent):
    """Frameworks send max_tokens 64000 for Claude (or none, and the model's limit applies): a key whose
    budget comfortably pays for a call must not be refused for a default it never chose."""
    key = env.issue(budget_usd=0.05, max_output_tokens=1_000, default_max_output_tokens=None)
    body = messages(max_tokens=asked) if asked else messages()
    if asked is None:
        body = json.dumps({k: v for k, v in json.loads(body).items() if k != "max_tokens"}).encode()
        admission = env.admit(call(key, body, "anthropic"))
        assert isinstance(admission, Denial) and "max_tokens" in admission.message  # Anthropic requires it
        return
    admission = env.admitted(call(key, body, "anthropic"))
    forwarded = json.loads(admission.upstream_body)["max_tokens"] if admission.upstream_body else asked
    assert forwarded == (sent or asked)
    assert admission.clamped_to == sent and admission.clamped_by == ("policy" if sent else None)
    assert admission.hold_micros == cost_micros(HAIKU, Usage(admission.facts.input_token_bound, sent or asked))


def test_the_ceiling_applies_when_the_request_names_no_limit(env):
    key = env.issue(max_output_tokens=300, default_max_output_tokens=None)
    admission = env.admitted(call(key, chat()))
    sent = json.loads(admission.upstream_body)
    assert sent.get("max_completion_tokens", sent.get("max_tokens")) == 300 and admission.clamped_by == "policy"


def test_a_refusal_of_the_body_names_the_model_it_asked_for(env):
    denial = env.denied(call(env.issue(), chat(max_tokens=-1)), DenyKind.BAD_REQUEST)
    assert denial.model == "gpt-4o-mini"
    assert env.denied(call(env.issue(), b"{not json"), DenyKind.BAD_REQUEST).model is None


# ----- every format through the gate: holds, unmetered endpoints, clamping -----


TEXT = "Summarise: " + " ".join(f"fact {i}: ünïcödé 数据 🙂" for i in range(300))


SCHEMA = {"type": "json_schema", "name": "out", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}


CACHED_SYSTEM = [{"type": "text", "text": TEXT, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]


# (provider, path, mock API, body): each billed by the mock at the longest reply the request allows.
SHAPES = {
    "responses-text": ("openai", "/v1/responses", Responses, {"model": "gpt-4o-mini", "input": TEXT}),
    "responses-items": (
        "openai", "/v1/responses", Responses,
        {"model": "gpt-4o-mini", "instructions": "Be brief.", "max_output_tokens": 50, "input": [
            {"role": "user", "content": [{"type": "input_text", "text": TEXT}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "earlier answer"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ]},
    ),
    "responses-schema-tools": (
        "openai", "/v1/responses", Responses,
        {"model": "gpt-4o-mini", "input": "hi", "text": {"format": SCHEMA},
         "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]},
    ),
    "responses-reasoning": (
        "openai", "/v1/responses", Responses,
        {"model": "o4-mini", "input": TEXT, "reasoning": {"effort": "high"}, "max_output_tokens": 300},
    ),
    "responses-previous": (
        "openai", "/v1/responses", Responses,
        {"model": "gpt-4o-mini", "input": "and then?", "previous_response_id": "resp_1", "max_output_tokens": 20},
    ),
    "completions-text": (
        "openai", "/v1/completions", Completions, {"model": "gpt-3.5-turbo-instruct", "prompt": TEXT},
    ),
    "completions-many": (
        "openai", "/v1/completions", Completions,
        {"model": "gpt-3.5-turbo-instruct", "prompt": ["a", TEXT, "c"], "n": 3, "max_tokens": 40},
    ),
    "completions-token-arrays": (
        "openai", "/v1/completions", Completions,
        {"model": "gpt-3.5-turbo-instruct", "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 7},
    ),
    "embeddings-text": ("openai", "/v1/embeddings", Embeddings, {"model": "text-embedding-3-small", "input": TEXT}),
    "embeddings-list": (
        "openai", "/v1/embeddings", Embeddings, {"model": "text-embedding-3-small", "input": [TEXT, "b", "🙂" * 50]},
    ),
    "embeddings-tokens": (
        "openai", "/v1/embeddings", Embeddings, {"model": "text-embedding-3-small", "input": [7] * 90},
    ),
    "anthropic-cache-write-1h": (
        "anthropic", "/v1/messages", Messages,
        {"model": "claude-haiku-4-5", "max_tokens": 100, "system": CACHED_SYSTEM,
         "messages": [{"role": "user", "content": "hi"}]},
    ),
    "anthropic-cache-in-message": (
        "anthropic", "/v1/messages", Messages,
        {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": [
            {"type": "text", "text": TEXT, "cache_control": {"type": "ephemeral"}}]}]},
    ),
    "gemini-text": (
        "gemini", "/v1beta/models/gemini-2.5-flash:generateContent", GenerateContent,
        {"contents": [{"role": "user", "parts": [{"text": TEXT}]}],
         "systemInstruction": {"parts": [{"text": "Be brief"}]}},
    ),
    "gemini-thinking-candidates": (
        "gemini", "/v1beta/models/gemini-2.5-flash:generateContent", GenerateContent,
        {"contents": [{"parts": [{"text": TEXT}]}], "generationConfig": {
            "maxOutputTokens": 200, "candidateCount": 2, "thinkingConfig": {"thinkingBudget": 150}}},
    ),
    "gemini-image": (
        "gemini", "/v1beta/models/gemini-2.5-flash:generateContent", GenerateContent,
        {"contents": [{"parts": [
            {"text": "what is it?"}, {"inlineData": {"mimeType": "image/png", "data": "iVBOR"}}]}]},
    ),
    "gemini-cached-content": (
        "gemini", "/v1beta/models/gemini-2.5-flash:generateContent", GenerateContent,
        {"contents": [{"parts": [{"text": "go on"}]}], "cachedContent": "cachedContents/x",
         "generationConfig": {"maxOutputTokens": 10}},
    ),
    "azure-deployment": (
        "azure", "/openai/deployments/prod-mini/chat/completions", Chat,
        {"messages": [{"role": "user", "content": TEXT}], "max_tokens": 30},
    ),
}  # fmt: skip


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_hold_covers_what_the_mock_bills(env, shape):
    provider, path, api, body = SHAPES[shape]
    admission = env.admitted(request(env.issue_any(), provider, path, body))
    sent = json.loads(admission.upstream_body) if admission.upstream_body else body
    if api is GenerateContent:
        sent = {**sent, "model": admission.facts.model}
    elif provider == "azure":
        sent = {**sent, "model": "prod-mini"}
    call = api.call(sent, count_o200k_tokens, 10**6, set())  # the longest reply allowed; a cold cache
    usage = Usage(
        call.input_tokens, call.output_tokens, call.cached_tokens, call.cache_write_tokens, call.reasoning_tokens,
        call.cache_write_1h_tokens,
    )  # fmt: skip
    assert cost_micros(admission.price, usage) <= admission.hold_micros
    assert call.input_tokens <= admission.facts.input_token_bound


def test_a_cache_write_is_held_at_its_premium(env):
    """Writing the whole prompt to Anthropic's one-hour cache costs twice the input price."""
    body = SHAPES["anthropic-cache-write-1h"][3]
    admission = env.admitted(request(env.issue_any(), "anthropic", "/v1/messages", body))
    bound = admission.facts.input_token_bound
    haiku = PRICES.lookup("anthropic", "claude-haiku-4-5")
    all_written = Usage(bound, 100, cache_write_tokens=bound, cache_write_1h_tokens=bound)
    assert admission.hold_micros == cost_micros(haiku, all_written) > cost_micros(haiku, Usage(bound, 100))
    uncached = env.admitted(request(env.issue_any(), "anthropic", "/v1/messages", {**body, "system": "plain"}))
    assert uncached.facts.may_write_cache is False


# ----- endpoints a policy lists as unmetered -----


def test_an_unmeterable_endpoint_is_refused_unless_listed_as_unmetered(env):
    refused = env.admit(request(env.issue_any(endpoints=["* /v1/*"]), "openai", "/v1/files", b"", method="GET"))
    assert isinstance(refused, Denial) and refused.kind is DenyKind.FORBIDDEN
    assert "unmetered_endpoints" in refused.message
    key = env.issue_any(endpoints=["POST /v1/chat/completions"], unmetered_endpoints=["GET /v1/files/*"])
    admission = env.admitted(request(key, "openai", "/v1/files/file-1", b"", method="GET"))
    assert (admission.unmetered, admission.hold_id, admission.remaining_micros) == (True, None, 1_000_000)


def test_unmetered_endpoints_never_unmeter_a_metered_one(env):
    key = env.issue_any(endpoints=["GET /v1/models"], unmetered_endpoints=["* /v1/**"])
    refused = env.admit(
        request(key, "openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user"}]})
    )
    assert isinstance(refused, Denial) and "not allowed" in refused.message


# ----- clamping the output limit to the budget -----


def chat_body(max_tokens: int | None = 1000, **fields) -> dict:
    limit = {} if max_tokens is None else {"max_tokens": max_tokens}
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}], **limit, **fields}


def test_clamp_finds_the_largest_output_limit_that_fits(env):
    key = env.issue_any(budget_usd=0.0002, clamp_max_tokens=True)
    admission = env.admitted(request(key, "openai", "/v1/chat/completions", chat_body()))
    clamped = admission.clamped_to
    assert json.loads(admission.upstream_body)["max_tokens"] == clamped
    price = PRICES.lookup("openai", "gpt-4o-mini")
    bound = admission.facts.input_token_bound
    assert admission.hold_micros == cost_micros(price, Usage(bound, clamped)) <= 200
    assert cost_micros(price, Usage(bound, clamped + 1)) > 200


def test_clamp_multiplies_by_every_choice(env):
    key = env.issue_any(budget_usd=0.0002, clamp_max_tokens=True)
    admission = env.admitted(request(key, "openai", "/v1/chat/completions", chat_body(n=4)))
    price = PRICES.lookup("openai", "gpt-4o-mini")
    assert admission.hold_micros == cost_micros(
        price, Usage(admission.facts.input_token_bound, 4 * admission.clamped_to)
    )


def test_clamp_refuses_when_not_even_one_token_fits(env):
    key = env.issue_any(budget_usd=0.000001, clamp_max_tokens=True)
    refused = env.admit(
        request(key, "openai", "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": TEXT}]))
    )
    assert isinstance(refused, Denial) and refused.kind is DenyKind.BUDGET


def test_a_fitting_call_is_not_clamped(env):
    admission = env.admitted(
        request(env.issue_any(clamp_max_tokens=True), "openai", "/v1/chat/completions", chat_body(max_tokens=10))
    )
    assert admission.clamped_to is None and admission.upstream_body is None


# ----- input the proxy cannot see, Azure deployments, keys in the query -----


def test_unseen_input_needs_a_known_context_window(env):
    key = env.issue_any()
    body = {"model": "gpt-4o-mini", "previous_response_id": "resp_1", "max_output_tokens": 5}
    admission = env.admitted(request(key, "openai", "/v1/responses", body))
    assert admission.facts.input_token_bound == 128_000
    no_window = PRICES.lookup("openai", "gpt-4o-mini").model_copy(update={"max_input_tokens": None})
    env.gate.prices.add("openai", "gpt-4o-mini", no_window)
    refused = env.admit(request(key, "openai", "/v1/responses", body))
    assert isinstance(refused, Denial) and "previous_response_id" in refused.message


def test_an_azure_deployment_is_matched_and_priced_as_the_model_it_runs(env):
    key = env.issue_any(models=["gpt-4o-mini*"])
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    admission = env.admitted(
        request(key, "azure", "/openai/deployments/prod-mini/chat/completions", body, query="api-version=1")
    )
    assert admission.facts.model == "gpt-4o-mini" and admission.price == PRICES.lookup("azure", "gpt-4o-mini")
    refused = env.admit(
        request(key, "azure", "/openai/deployments/other/chat/completions", body, query="api-version=1")
    )
    assert isinstance(refused, Denial) and "model other is not allowed" in refused.message


def test_a_key_in_the_query_string_counts_as_a_credential(env):
    key = env.issue_any()
    path, body = "/v1beta/models/gemini-2.5-flash:generateContent", b'{"contents": [{"parts": [{"text": "hi"}]}]}'
    in_query = CallRequest("gemini", "POST", path, {}, body, query=f"alt=sse&key={key}")
    assert isinstance(asyncio.run(admit_or_denial(env.gate, in_query)), Admission)
    real = CallRequest("gemini", "POST", path, {}, body, query=f"key={REAL_KEYS['GEMINI_API_KEY']}")
    refused = asyncio.run(admit_or_denial(env.gate, real))
    assert isinstance(refused, Denial) and "real provider key" in refused.message


def test_a_model_refusal_lists_only_the_globs_for_that_provider(env):
    key = env.issue(models=["gpt-4o-mini*", "claude-haiku-4-5*"])
    refused = env.denied(call(key, messages(model="claude-opus-4-1"), "anthropic"), DenyKind.FORBIDDEN)
    assert "claude-haiku-4-5*" in refused.message and "gpt-4o-mini" not in refused.message
    refused = env.denied(call(key, chat(model="gpt-4o")), DenyKind.FORBIDDEN)
    assert "gpt-4o-mini*" in refused.message and "claude" not in refused.message
