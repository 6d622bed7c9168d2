"""A call that is not forwarded holds nothing, whatever step refused it, and bad input is a 400."""

import openai
import pytest

from conftest import httpx, write_policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"), "refusals", budget_usd=1.0)


def balances(proxy, key_id: str) -> tuple[int, int]:
    ledger = proxy.ledger()
    try:
        record = ledger.get_key(key_id)
    finally:
        ledger.close()
    return record.spent_micros, record.held_micros


@pytest.mark.parametrize(
    "fields",
    [
        {"stream": True, "stream_options": "x"},
        {"stream": True, "stream_options": ["include_usage"]},
        {"max_tokens": "many"},
        {"messages": "hello"},
    ],
    ids=["stream-options-string", "stream-options-list", "max-tokens-string", "messages-string"],
)
def test_bad_input_is_a_400_that_holds_nothing_and_reaches_nobody(proxy, mock, policy, fields):
    key = proxy.issue(policy)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **fields}
    answer = httpx.post(
        f"{proxy.gateway_url}/openai/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key['key']}"},
        timeout=10,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert balances(proxy, key["id"]) == (0, 0)
    assert not mock.received
    [record] = proxy.records_for(key["id"])
    assert record["decision"] == "deny" and record["status"] == 400


def test_the_sdk_sees_a_bad_request_error(proxy, mock, policy):
    key = proxy.issue(policy)
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options="x"
        )
    assert balances(proxy, key["id"]) == (0, 0)
