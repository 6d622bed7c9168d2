"""A provider that does not keep to the output limit: the money was spent, so it is charged in full.

The audit says `overrun`, a counter counts it, and the key, now past its budget, is refused from then on.
"""

import openai
import pytest

from conftest import assert_ledger_matches_audit, httpx, write_policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"), "overrun", budget_usd=0.002)


def test_usage_above_the_hold_is_charged_in_full_and_the_key_stops(proxy, mock, policy):
    key = proxy.issue(policy)
    client = openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)
    mock.overrun_next(output_tokens=5_000)  # gpt-4o-mini bills $0.60 per million output tokens: $0.003
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    [record] = proxy.records_for(key["id"])
    assert record["metering"] == "overrun" and record["output_tokens"] == 5_000
    assert record["cost_micros"] > record["hold_micros"] and "more than the call's hold" in record["reason"]

    state = assert_ledger_matches_audit(proxy, key["id"])
    assert state.spent_micros == record["cost_micros"]
    assert state.spent_micros > state.budget_micros

    with pytest.raises((openai.RateLimitError, openai.APIStatusError)) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert refused.value.status_code in (402, 429)
    assert len(mock.received) == 1

    metrics = httpx.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=5).text
    assert 'agentkeys_overruns_total{model="gpt-4o-mini",policy="overrun",provider="openai"} 1.0' in metrics
