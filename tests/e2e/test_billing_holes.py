"""An agent that tries to spend more than its budget, end to end: the call is refused, or charged at
least what the provider bills, and the ledger equals the audit.

Each test sends what an attacker would (through the real proxy, to the mock provider): a cache breakpoint
spelled with a JSON escape, a key twice in one body, absurd numbers and nesting, a path that climbs out
of an unmetered endpoint, a model billed per search or per image; and a provider that reports usage no
one can believe.
"""

import http.client
import json

import anthropic
import openai
import pytest

from conftest import httpx, start_proxy, stop_proxy, write_policy

ENDPOINTS = ["POST /v1/chat/completions", "POST /v1/messages", "POST /v1beta/models/*:generateContent"]
MODELS = ["gpt-4o-mini*", "claude-haiku-4-5*", "gemini-2.5-flash*"]
USER_X = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def proxy(mock, tmp_path_factory):
    providers = {name: {"upstream": mock.url} for name in ("openai", "anthropic", "gemini")}
    running = start_proxy(tmp_path_factory.mktemp("proxy"), mock, providers=providers)
    yield running
    stop_proxy(running)


def issue(proxy, tmp_path, budget_usd: float = 1.0, **fields) -> dict:
    fields = {"providers": ["openai", "anthropic", "gemini"], "endpoints": ENDPOINTS, "models": MODELS, **fields}
    return proxy.issue(write_policy(tmp_path, "holes", **fields), "--budget", str(budget_usd))


def post(proxy, key: dict, path: str, body: bytes | str) -> httpx.Response:
    """A raw POST through the gateway: the body's bytes exactly as given (an SDK would re-serialise them)."""
    content = body.encode() if isinstance(body, str) else body
    headers = {"authorization": f"Bearer {key['key']}", "x-api-key": key["key"], "content-type": "application/json"}
    if path.startswith("/gemini/"):
        headers = {"x-goog-api-key": key["key"], "content-type": "application/json"}
    return httpx.post(f"{proxy.gateway_url}{path}", content=content, headers=headers, timeout=30)


def ledger_equals_audit(proxy, key: dict, count: int) -> dict:
    """The key's spend in the store is the sum of its audit records' costs, and never above its budget."""
    records = proxy.records_for(key["id"], count)
    record = proxy.ledger().get_key(key["id"])
    assert record.held_micros == 0
    assert record.spent_micros == sum(r["cost_micros"] for r in records)
    assert record.spent_micros <= record.budget_micros
    return records[-1]


def metered_calls(mock) -> list:
    return [r for r in mock.received if r.method == "POST"]


# ----- item 3: a hold reads the parsed body, never its bytes -----

ESCAPED_CACHE = "cache\\u005fcontrol"


# Text of one byte per token, so the hold cannot hide a price difference in the slack of its byte bound.
DENSE_TEXT = "1 2 3 " * 1000


def cached_message(text: str, marker: str) -> str:
    system = [{"type": "text", "text": text, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    body = {"model": "claude-haiku-4-5", "max_tokens": 8, "system": system, "messages": USER_X}
    return json.dumps(body).replace('"cache_control"', f'"{marker}"')


def test_an_escaped_cache_breakpoint_is_held_at_the_cache_write_price(proxy, mock, tmp_path):
    key = issue(proxy, tmp_path)
    answer = post(proxy, key, "/anthropic/v1/messages", cached_message(DENSE_TEXT, ESCAPED_CACHE))
    assert answer.status_code == 200, answer.text
    assert mock.reported[-1]["cache_write_tokens"] > 6000  # the provider read the escape and wrote the cache
    record = ledger_equals_audit(proxy, key, 1)
    assert record["metering"] == "usage" and record["cache_write_tokens"] == mock.reported[-1]["cache_write_tokens"]
    assert record["cost_micros"] <= record["hold_micros"]


def test_escaped_cache_writes_cannot_overspend_a_budget(proxy, mock, tmp_path):
    """Each call writes a new one-hour cache (its text differs); the calls stop before the budget is passed."""
    key = issue(proxy, tmp_path, budget_usd=0.045)
    statuses = []
    for i in range(12):
        answer = post(proxy, key, "/anthropic/v1/messages", cached_message(f"call {i} " + DENSE_TEXT, ESCAPED_CACHE))
        statuses.append(answer.status_code)
        if answer.status_code == 402:
            break
    assert 402 in statuses and statuses[0] == 200
    ledger_equals_audit(proxy, key, len(statuses))


# ----- item 4: a key twice in one body -----

CHAT = "/openai/v1/chat/completions"
MESSAGES = "/anthropic/v1/messages"
GENERATE = "/gemini/v1beta/models/gemini-2.5-flash:generateContent"


def chat_with(fields: str) -> str:
    """A chat completion body with `fields` written in as raw JSON text (duplicates and all)."""
    return '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], ' + fields + "}"


def message_with(fields: str) -> str:
    return '{"messages": [{"role": "user", "content": "x"}], ' + fields + "}"


@pytest.mark.parametrize(
    ("path", "body", "key_named"),
    [
        (CHAT, '{"model": "gpt-4o", "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}', "model"),
        (CHAT, chat_with('"max_tokens": 1, "max_tokens": 100000'), "max_tokens"),
        (CHAT, '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x", "content": "yy"}]}', "content"),
        (MESSAGES, message_with('"model": "claude-opus-4-5", "model": "claude-haiku-4-5", "max_tokens": 5'), "model"),
        (GENERATE, '{"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"maxOutputTokens": 1, '
                   '"maxOutputTokens": 99999}}', "maxOutputTokens"),
    ],
)  # fmt: skip
def test_a_body_with_a_key_twice_is_refused_naming_the_key(proxy, mock, tmp_path, path, body, key_named):
    key = issue(proxy, tmp_path)
    answer = post(proxy, key, path, body)
    assert answer.status_code == 400, answer.text
    assert f"'{key_named}' appears twice" in answer.text
    assert metered_calls(mock) == []
    assert proxy.records_for(key["id"])[0]["decision"] == "deny"


# ----- issue 12's share of the same parse: absurd nesting and numbers are 400s, not 500s -----


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, '{"model": "gpt-4o-mini", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        (MESSAGES, '{"model": "claude-haiku-4-5", "x": ' + '{"a":' * 100_000 + "1" + "}" * 100_001),
        (CHAT, chat_with('"max_tokens": 1e29')),
        (CHAT, chat_with(f'"max_tokens": {10**30}')),
        (CHAT, chat_with('"max_tokens": 10000000000')),
        (CHAT, chat_with('"n": 1000000, "max_tokens": 100000')),
        (MESSAGES, message_with(f'"model": "claude-haiku-4-5", "max_tokens": {10**30}')),
        (CHAT, chat_with('"max_tokens": NaN')),
        (CHAT, chat_with('"stream": true, "stream_options": "x"')),
    ],
)
def test_absurd_bodies_are_bad_requests_and_the_proxy_keeps_serving(proxy, mock, tmp_path, path, body):
    key = issue(proxy, tmp_path)
    answer = post(proxy, key, path, body)
    assert answer.status_code == 400, answer.text[:300]
    assert metered_calls(mock) == []
    assert proxy.ledger().get_key(key["id"]).held_micros == 0
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=USER_X).choices


# ----- item 5: usage that is not a sane count is charged the full hold, saying why -----


@pytest.mark.parametrize(
    ("field", "value", "stream"),
    [
        ("completion_tokens", -100_000, False),
        ("prompt_tokens", -1, False),
        ("completion_tokens", 1.5e293, False),
        ("completion_tokens", 2.5, True),
        ("prompt_tokens", "12", True),
        ("completion_tokens", 10**15, False),
    ],
)
def test_openai_usage_that_is_not_a_count_is_charged_the_hold(proxy, mock, tmp_path, field, value, stream):
    key = issue(proxy, tmp_path)
    mock.corrupt_next_usage(field, value)
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    if stream:
        list(client.chat.completions.create(model="gpt-4o-mini", messages=USER_X, stream=True))
    else:
        client.chat.completions.create(model="gpt-4o-mini", messages=USER_X)
    record = ledger_equals_audit(proxy, key, 1)
    assert record["metering"] == "held" and record["cost_micros"] == record["hold_micros"] > 0
    assert f"usage not believed: the provider reported {field}={value!r}" in record["reason"]


@pytest.mark.parametrize(
    ("field", "value"), [("output_tokens", -50), ("input_tokens", True), ("cache_read_input_tokens", 0.5)]
)
@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_usage_that_is_not_a_count_is_charged_the_hold(proxy, mock, tmp_path, field, value, stream):
    key = issue(proxy, tmp_path)
    mock.corrupt_next_usage(field, value)
    client = anthropic.Anthropic(api_key=key["key"], base_url=f"{proxy.gateway_url}/anthropic", max_retries=0)
    if stream:
        with client.messages.stream(model="claude-haiku-4-5", max_tokens=20, messages=USER_X) as events:
            list(events)
    else:
        client.messages.create(model="claude-haiku-4-5", max_tokens=20, messages=USER_X)
    record = ledger_equals_audit(proxy, key, 1)
    assert record["metering"] == "held" and record["cost_micros"] == record["hold_micros"] > 0
    assert f"{field}={value!r}" in record["reason"]


def test_gemini_usage_that_is_not_a_count_is_charged_the_hold(proxy, mock, tmp_path):
    key = issue(proxy, tmp_path)
    mock.corrupt_next_usage("candidatesTokenCount", -7)
    body = {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"maxOutputTokens": 50}}
    answer = post(proxy, key, "/gemini/v1beta/models/gemini-2.5-flash:generateContent", json.dumps(body))
    assert answer.status_code == 200, answer.text
    record = ledger_equals_audit(proxy, key, 1)
    assert record["metering"] == "held" and record["cost_micros"] == record["hold_micros"] > 0
    assert "candidatesTokenCount=-7" in record["reason"]


# ----- item 7: models billed beyond their tokens are refused, whatever glob admits them -----


def test_a_search_model_under_a_broad_glob_is_refused_saying_why(proxy, mock, tmp_path):
    key = issue(proxy, tmp_path)
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    for model in ("gpt-4o-mini-search-preview", "gpt-4o-mini-search-preview-2025-03-11", "gpt-4o-mini-tts"):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(model=model, messages=USER_X)
        assert f"model {model} cannot be metered" in refused.value.message
    assert "searches the web on every call" in proxy.records_for(key["id"], 3)[0]["reason"]
    assert metered_calls(mock) == []


def test_an_image_model_under_a_broad_glob_is_refused_saying_why(proxy, mock, tmp_path):
    key = issue(proxy, tmp_path)
    body = {"contents": [{"parts": [{"text": "draw a cat"}]}]}
    answer = post(proxy, key, "/gemini/v1beta/models/gemini-2.5-flash-image:generateContent", json.dumps(body))
    assert answer.status_code == 403 and answer.json()["error"]["status"] == "PERMISSION_DENIED"
    assert "image generation" in answer.json()["error"]["message"]
    assert metered_calls(mock) == []


# ----- item 8: paths are matched, and forwarded, in their normal form -----


def raw_request(proxy, method: str, path: str, key: dict, body: bytes = b"") -> tuple[int, str]:
    """A request whose path goes out byte for byte (HTTP clients normalise `..` themselves)."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.gateway_port, timeout=30)
    try:
        headers = {"authorization": f"Bearer {key['key']}", "content-type": "application/json"}
        connection.request(method, path, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


CHAT_GPT_4O = json.dumps({"model": "gpt-4o", "messages": USER_X}).encode()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/openai/v1/files/../chat/completions", 403),
        ("/openai/v1/files/%2e%2e/chat/completions", 403),
        ("/openai/v1/files/%2E%2e/chat/completions", 403),
        ("/openai/v1/files/.%2e/chat/completions", 403),
        ("/openai/v1/files/./../chat/completions", 403),
        ("/openai/v1/files%2f..%2fchat/completions", 400),
        ("/openai/v1/files%2F..%2Fchat%2Fcompletions", 400),
        ("/openai/v1/files/%252e%252e/chat/completions", 400),
        ("/openai/v1/files/../../../v1/chat/completions", 400),
    ],
)
def test_a_path_climbing_out_of_an_unmetered_endpoint_is_never_forwarded_unmetered(proxy, mock, tmp_path, path, status):
    key = issue(proxy, tmp_path, unmetered_endpoints=["POST /v1/files*"])
    answer_status, text = raw_request(proxy, "POST", path, key, CHAT_GPT_4O)
    assert answer_status == status, text
    if status == 403:  # it was matched as what it is: a chat completion, for a model the policy does not allow
        assert "model gpt-4o is not allowed" in text
    assert mock.received == []


def test_the_path_forwarded_is_the_one_matched(proxy, mock, tmp_path):
    key = issue(proxy, tmp_path, endpoints=["GET /v1/models"], unmetered_endpoints=["GET /v1/files"])
    for path in ("/openai/v1//files", "/openai/v1/x/../files", "/openai/v1/%66iles/", "/openai/v1/./files"):
        status, text = raw_request(proxy, "GET", path, key)
        assert status == 200, (path, text)
        assert mock.received[-1].path == "/v1/files"
    records = proxy.records_for(key["id"], 4)
    assert {(r["path"], r["metering"]) for r in records} == {("/v1/files", "unmetered")}


def test_an_unmetered_glob_does_not_cross_segments(proxy, mock, tmp_path):
    key = issue(proxy, tmp_path, unmetered_endpoints=["POST /v1/files*"])
    status, text = raw_request(proxy, "POST", "/openai/v1/files/file-1/content", key, b"{}")
    assert status == 403 and "endpoint POST /v1/files/file-1/content is not allowed" in text
    assert mock.received == []


# ----- item 8: a child key's unmetered endpoints are only those it asked for, within its parent's -----


def control(proxy, method: str, path: str, key: str, **kwargs) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    return httpx.request(method, f"{proxy.gateway_url}/_agentkeys/v1{path}", headers=headers, **kwargs)


def test_a_child_key_gets_only_the_unmetered_endpoints_it_asks_for(proxy, mock, tmp_path):
    parent = issue(proxy, tmp_path, max_child_depth=1, unmetered_endpoints=["GET /v1/files", "GET /v1/files/*"])
    assert control(proxy, "GET", "/keys/self", parent["key"]).json()["unmetered_endpoints"] == [
        "GET /v1/files",
        "GET /v1/files/*",
    ]
    asked = {"name": "w", "budget_usd": 0.01, "ttl": "5m"}
    plain = control(proxy, "POST", "/keys", parent["key"], json=asked)
    assert plain.status_code == 201, plain.text
    assert control(proxy, "GET", "/keys/self", plain.json()["key"]).json()["unmetered_endpoints"] == []
    status, text = raw_request(proxy, "GET", "/openai/v1/files", {"key": plain.json()["key"]})
    assert status == 403 and "endpoint GET /v1/files is not allowed" in text
    assert mock.received == []

    files = control(proxy, "POST", "/keys", parent["key"], json={**asked, "unmetered_endpoints": ["GET /v1/files"]})
    assert files.status_code == 201, files.text
    assert control(proxy, "GET", "/keys/self", files.json()["key"]).json()["unmetered_endpoints"] == ["GET /v1/files"]
    assert raw_request(proxy, "GET", "/openai/v1/files", {"key": files.json()["key"]})[0] == 200
    assert raw_request(proxy, "GET", "/openai/v1/files/file-1", {"key": files.json()["key"]})[0] == 403

    wider = control(proxy, "POST", "/keys", parent["key"], json={**asked, "unmetered_endpoints": ["GET /v1/**"]})
    assert wider.status_code == 403 and "unmetered_endpoints GET /v1/** are not within" in wider.text
