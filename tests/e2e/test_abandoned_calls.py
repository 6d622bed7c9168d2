"""An agent that gives up after its call reached the provider is charged as the provider bills it.

The provider finishes (and bills) a call whose client went away, so every way of leaving costs the
full hold: HTTP/2 RST_STREAM with any error code, GOAWAY, a TCP reset, an HTTP/1.1 close; in a
stream and not. A stream that ends without the provider's usage is charged its hold too: what was
visible says nothing of the reasoning tokens the provider bills. A call that never reached the
provider costs nothing. Each case checks that the ledger equals the audit.
"""

import json
import socket
import struct
import time

import h2.errors
import h2.events
import pytest

from conftest import assert_ledger_matches_audit, write_policy
from h2_agent import H2Agent


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policies"), "abandon", budget_usd=1.0)


def wait_for_the_provider(mock, count: int = 1, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while len(mock.received) < count:
        assert time.monotonic() < deadline, "the call never reached the provider"
        time.sleep(0.02)


def chat(stream: bool = False) -> dict:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}
    return {**body, "stream": True} if stream else body


def settled_record(proxy, key: dict) -> dict:
    [record] = proxy.records_for(key["id"])
    assert_ledger_matches_audit(proxy, key["id"])
    return record


def reset_with(code):
    def leave(agent: H2Agent, stream_id: int):
        agent.conn.reset_stream(stream_id, error_code=code)
        agent.flush()
        time.sleep(0.5)
        agent.close()

    return leave


def go_away(agent: H2Agent, stream_id: int):
    agent.conn.close_connection()
    agent.flush()
    agent.close()


def tcp_reset(agent: H2Agent, stream_id: int):
    agent.tcp_reset()


LEAVES = {
    "rst-cancel": reset_with(h2.errors.ErrorCodes.CANCEL),
    "rst-no-error": reset_with(h2.errors.ErrorCodes.NO_ERROR),
    "rst-internal": reset_with(h2.errors.ErrorCodes.INTERNAL_ERROR),
    "goaway": go_away,
    "tcp-reset": tcp_reset,
}


@pytest.mark.parametrize("leave", LEAVES.values(), ids=LEAVES.keys())
def test_an_h2_call_abandoned_after_it_reached_the_provider_is_charged_its_hold(proxy, mock, policy, leave):
    key = proxy.issue(policy)
    mock.delay_next(1.5)
    agent = H2Agent(proxy, key["key"])
    stream_id = agent.post(chat())
    wait_for_the_provider(mock)
    leave(agent, stream_id)
    record = settled_record(proxy, key)
    assert record["metering"] == "held" and record["cost_micros"] == record["hold_micros"] > 0


@pytest.mark.parametrize("leave", LEAVES.values(), ids=LEAVES.keys())
def test_an_h2_stream_abandoned_part_way_is_charged_its_hold(proxy, mock, policy, leave):
    """The first visible tokens say nothing of what the provider bills for the rest (or for reasoning)."""
    key = proxy.issue(policy)
    mock.stall_next_stream(1.5)
    agent = H2Agent(proxy, key["key"])
    stream_id = agent.post(chat(stream=True))
    agent.read_until(lambda event: isinstance(event, h2.events.DataReceived) and b"content" in event.data)
    leave(agent, stream_id)
    record = settled_record(proxy, key)
    assert record["metering"] == "held" and record["cost_micros"] == record["hold_micros"] > 0


def test_an_h2_call_that_completes_is_charged_its_usage(proxy, mock, policy):
    key = proxy.issue(policy)
    agent = H2Agent(proxy, key["key"])
    stream_id = agent.post(chat())
    agent.read_until(lambda event: isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id)
    agent.close()
    record = settled_record(proxy, key)
    assert record["metering"] == "usage" and 0 < record["cost_micros"] < record["hold_micros"]


def test_a_stream_cut_by_the_provider_is_charged_its_hold(proxy, mock, policy):
    """A provider that drops the connection mid-stream has still spent the tokens it generated."""
    key = proxy.issue(policy)
    mock.cut_next_stream(after_chunks=2)
    agent = H2Agent(proxy, key["key"])
    stream_id = agent.post(chat(stream=True))
    agent.read_until(lambda event: isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)))
    agent.close()
    record = settled_record(proxy, key)
    assert stream_id and record["metering"] == "held" and record["cost_micros"] == record["hold_micros"]


def test_an_h2_call_abandoned_before_it_reached_the_provider_costs_nothing(proxy, mock, policy, monkeypatch):
    """Refused by the budget: nothing was forwarded, nothing is held."""
    key = proxy.issue(policy, "--budget", "0.000001")
    agent = H2Agent(proxy, key["key"])
    stream_id = agent.post(chat())
    event = agent.read_until(lambda event: isinstance(event, h2.events.ResponseReceived))
    agent.close()
    assert dict(event.headers)[b":status"] in (b"402", b"429")
    record = settled_record(proxy, key)
    assert stream_id and record["decision"] == "deny" and record["cost_micros"] == 0
    assert not mock.received


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_http1_call_abandoned_after_it_reached_the_provider_is_charged_its_hold(proxy, mock, policy, stream):
    """HTTP/1.1 has one way to give up: closing the connection (here with a TCP reset, the harshest)."""
    key = proxy.issue(policy)
    if stream:
        mock.stall_next_stream(1.5)
    else:
        mock.delay_next(1.5)
    body = json.dumps(chat(stream=stream)).encode()
    agent = socket.create_connection(("127.0.0.1", proxy.gateway_port), timeout=10)
    agent.sendall(
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (key["key"].encode(), len(body), body)
    )
    if stream:
        assert b"content" in agent.recv(65536) or b"content" in agent.recv(65536)
    else:
        wait_for_the_provider(mock)
    agent.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    agent.close()
    record = settled_record(proxy, key)
    assert record["metering"] == "held" and record["cost_micros"] == record["hold_micros"] > 0
