"""Self-tests for the mock provider, driven by the official SDKs and raw HTTP."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import openai
import pydantic
import pytest

from conftest import httpx
from mock_provider import MockProvider

OPENAI_KEY = "sk-test-real-openai"
ANTHROPIC_KEY = "sk-ant-test-real-anthropic"
HELLO_12 = " ".join(["hello"] * 12)


@pytest.fixture(scope="module")
def server():
    mock = MockProvider().start()
    yield mock
    mock.stop()


@pytest.fixture
def mock(server):
    server.reset()
    return server


@pytest.fixture
def oai(mock):
    return openai.OpenAI(api_key=OPENAI_KEY, base_url=mock.url + "/v1", max_retries=0)


@pytest.fixture
def claude(mock):
    return anthropic.Anthropic(api_key=ANTHROPIC_KEY, base_url=mock.url, max_retries=0)


def raw(mock, method, path, body=None, headers=None):
    """Send one request without an SDK; returns (status, headers, body bytes)."""
    connection = http.client.HTTPConnection(mock.url.removeprefix("http://"))
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


USER_HI = [{"role": "user", "content": "Say hi"}]


# -- OpenAI ------------------------------------------------------------------


def test_openai_chat_reports_its_usage(mock, oai):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Say hi"}, {"type": "image_url"}],
            "name": "bob",
        },
    ]
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=messages)

    count = mock.count_tokens
    expected_input = (
        (3 + count("system") + count("Be brief.")) + (3 + count("user") + count("Say hi") + 1 + count("bob")) + 3
    )
    assert reply.model == "gpt-4o-mini"
    assert reply.choices[0].message.content == HELLO_12
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == expected_input
    assert reply.usage.completion_tokens == 12 == count(HELLO_12)
    assert mock.reported == [
        {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "input_tokens": expected_input,
            "output_tokens": 12,
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
            "stream": False,
        }
    ]


def test_openai_max_tokens_caps_the_reply(mock, oai):
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=USER_HI, max_completion_tokens=3)
    assert reply.choices[0].message.content == "hello hello hello"
    assert reply.choices[0].finish_reason == "length"
    assert mock.reported[0]["output_tokens"] == 3


def test_openai_stream_with_usage(mock, oai):
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=USER_HI, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert text == HELLO_12
    assert len(chunks) == 1 + 12 + 1 + 1  # role, tokens, finish_reason, usage
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert mock.reported == [
        {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
            "stream": True,
        }
    ]


def test_openai_stream_wire_format(mock):
    body = json.dumps({"model": "m", "messages": USER_HI, "stream": True, "max_tokens": 2})
    status, headers, data = raw(mock, "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {OPENAI_KEY}"})
    events = data.decode().split("\n\n")
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    assert headers["Transfer-Encoding"] == "chunked"
    assert events[-2:] == ["data: [DONE]", ""]
    assert all('"usage"' not in event for event in events)  # no include_usage, no usage key
    assert len(events) == 1 + 2 + 1 + 1 + 1


# -- Anthropic ---------------------------------------------------------------


def test_anthropic_message_reports_its_usage(mock, claude):
    message = claude.messages.create(model="claude-test", max_tokens=100, system="Be brief.", messages=USER_HI)
    expected_input = mock.count_tokens("Be brief.") + mock.count_tokens("Say hi") + 4 + 3
    assert message.content[0].text == HELLO_12
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == expected_input
    assert message.usage.output_tokens == 12
    assert mock.reported == [
        {
            "provider": "anthropic",
            "model": "claude-test",
            "input_tokens": expected_input,
            "output_tokens": 12,
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
            "stream": False,
        }
    ]


def test_anthropic_max_tokens_caps_the_reply(mock, claude):
    message = claude.messages.create(model="claude-test", max_tokens=2, messages=USER_HI)
    assert message.content[0].text == "hello hello"
    assert message.stop_reason == "max_tokens"


def test_anthropic_stream_helper(mock, claude):
    with claude.messages.stream(model="claude-test", max_tokens=100, messages=USER_HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == HELLO_12
    assert final.usage.output_tokens == 12
    assert mock.reported == [
        {
            "provider": "anthropic",
            "model": "claude-test",
            "input_tokens": final.usage.input_tokens,
            "output_tokens": 12,
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
            "stream": True,
        }
    ]


def test_anthropic_raw_stream_events(mock, claude):
    events = list(claude.messages.create(model="claude-test", max_tokens=3, messages=USER_HI, stream=True))
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the SDK swallows the ping
    assert events[-2].usage.output_tokens == 3
    assert events[-2].delta.stop_reason == "max_tokens"


def test_anthropic_accepts_x_api_key_and_requires_max_tokens(mock):
    body = json.dumps({"model": "claude-test", "messages": USER_HI})
    status, _, data = raw(mock, "POST", "/v1/messages", body, {"x-api-key": ANTHROPIC_KEY})
    assert status == 400
    assert json.loads(data)["error"]["type"] == "invalid_request_error"
    assert mock.reported == []


# -- Auth, routing, recording ------------------------------------------------


def test_wrong_keys_are_rejected(mock):
    bad_openai = openai.OpenAI(api_key="sk-wrong", base_url=mock.url + "/v1", max_retries=0)
    bad_claude = anthropic.Anthropic(api_key="sk-ant-wrong", base_url=mock.url, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_openai.chat.completions.create(model="gpt-4o-mini", messages=USER_HI)
    with pytest.raises(anthropic.AuthenticationError):
        bad_claude.messages.create(model="claude-test", max_tokens=5, messages=USER_HI)
    assert [r.path for r in mock.received] == ["/v1/chat/completions", "/v1/messages"]
    assert mock.received[0].headers["authorization"] == "Bearer sk-wrong"
    assert mock.reported == []


def test_models_and_unknown_routes(mock, oai):
    assert [model.id for model in oai.models.list()] == ["gpt-4o-mini"]
    status, _, data = raw(mock, "GET", "/v1/nothing?x=1")
    assert status == 404
    assert "error" in json.loads(data)
    assert (mock.received[-1].path, mock.received[-1].query) == ("/v1/nothing", "x=1")
    assert mock.reported == []


def test_received_records_the_request(mock, oai):
    oai.chat.completions.create(model="gpt-4o-mini", messages=USER_HI)
    request = mock.received[0]
    assert (request.method, request.path, request.query) == ("POST", "/v1/chat/completions", "")
    assert request.headers["content-type"] == "application/json"
    assert request.json == json.loads(request.body) == {"model": "gpt-4o-mini", "messages": USER_HI}


def test_chunked_request_body(mock):
    def body():
        yield b'{"model": "m", '
        yield b'"messages": [{"role": "user", "content": "Say hi"}]}'

    connection = http.client.HTTPConnection(mock.url.removeprefix("http://"))
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=body(),
        headers={"Authorization": f"Bearer {OPENAI_KEY}"},
        encode_chunked=True,
    )
    assert connection.getresponse().status == 200
    connection.close()
    assert mock.received[0].json["model"] == "m"


# -- Injected behaviours -----------------------------------------------------


def test_fail_next(mock, oai, claude):
    mock.fail_next(500, count=2)
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model="gpt-4o-mini", messages=USER_HI)
    with pytest.raises(anthropic.APIStatusError) as failure:
        claude.messages.create(model="claude-test", max_tokens=5, messages=USER_HI)
    assert failure.value.status_code == 500
    assert failure.value.body["type"] == "error"
    assert mock.reported == []
    oai.chat.completions.create(model="gpt-4o-mini", messages=USER_HI)
    assert len(mock.reported) == 1


def test_cut_next_stream_openai(mock, oai):
    mock.cut_next_stream(after_chunks=2)
    stream = oai.chat.completions.create(
        model="gpt-4o-mini", messages=USER_HI, stream=True, stream_options={"include_usage": True}
    )
    received = []
    with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "hello", " hello"]
    assert mock.reported == []
    oai.chat.completions.create(model="gpt-4o-mini", messages=USER_HI, stream=True).close()


def test_cut_next_stream_anthropic(mock, claude):
    mock.cut_next_stream(after_chunks=1)
    with (
        pytest.raises(httpx.RemoteProtocolError),
        claude.messages.stream(model="claude-test", max_tokens=100, messages=USER_HI) as stream,
    ):
        for _ in stream:
            pass
    assert mock.reported == []


def test_delay_next(mock, oai):
    mock.delay_next(0.3)
    started = time.monotonic()
    oai.chat.completions.create(model="gpt-4o-mini", messages=USER_HI)
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    oai.chat.completions.create(model="gpt-4o-mini", messages=USER_HI)
    assert time.monotonic() - started < 0.3


def test_injected_token_counter():
    mock = MockProvider(count_tokens=len, output_tokens=2).start()
    try:
        client = openai.OpenAI(api_key=OPENAI_KEY, base_url=mock.url + "/v1", max_retries=0)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "abc"}])
        assert reply.usage.prompt_tokens == 3 + len("user") + len("abc") + 3
        assert reply.choices[0].message.content == "hello hello"
    finally:
        mock.stop()


def test_command_line_server():
    tests = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "mock_provider", "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=tests)
    try:
        line = process.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:")
        client = openai.OpenAI(api_key=OPENAI_KEY, base_url=line.split()[-1] + "/v1", max_retries=0)
        assert [model.id for model in client.models.list()] == ["gpt-4o-mini"]
    finally:
        process.kill()
        process.wait()


# -- tool calls and structured output, as the frameworks' loops need them -------------------------

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}


class City(pydantic.BaseModel):
    name: str
    population: int
    tags: list[str]


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_calls_the_tool_then_answers_its_result(oai, stream):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER_PARAMETERS}}]
    asked = [{"role": "user", "content": "Weather?"}]
    if stream:
        chunks = list(oai.chat.completions.create(model="gpt-4o-mini", messages=asked, tools=tools, stream=True))
        calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
        assert calls[0].function.name == "weather" and json.loads(calls[-1].function.arguments)["days"] == 1
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        return
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=asked, tools=tools).choices[0]
    assert reply.finish_reason == "tool_calls"
    call = reply.message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("weather", {"city": "hello", "days": 1})
    answered = [*asked, reply.message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    final = oai.chat.completions.create(model="gpt-4o-mini", messages=answered, tools=tools).choices[0]
    assert final.message.content == HELLO_12 and final.finish_reason == "stop"


def test_structured_output_fits_the_schema_in_each_api(oai, claude):
    assert isinstance(oai.chat.completions.parse(model="gpt-4o-mini", messages=USER_HI, response_format=City)
                      .choices[0].message.parsed, City)  # fmt: skip
    assert isinstance(oai.responses.parse(model="gpt-4o-mini", input="hi", text_format=City).output_parsed, City)
    tool = {"name": "city", "input_schema": City.model_json_schema()}
    message = claude.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=USER_HI, tools=[tool],
                                     tool_choice={"type": "tool", "name": "city"})  # fmt: skip
    assert message.stop_reason == "tool_use" and City.model_validate(message.content[0].input)


def test_tool_choice_none_is_answered_in_text(oai):
    tools = [{"type": "function", "name": "weather", "parameters": WEATHER_PARAMETERS}]
    reply = oai.responses.create(model="gpt-4o-mini", input="hi", tools=tools, tool_choice="none")
    assert reply.output_text == HELLO_12
