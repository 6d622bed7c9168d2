"""What agent frameworks send besides plain model calls, through the real proxy with the official SDKs:
the Agents SDK's traces and the Conversations API (free, when the policy lists them), tools the client
runs itself (admitted) and hosted ones (refused, saying why), compaction (metered as a model call), and
documents (a PDF held by its pages in every format; a file only the provider reads at the context window)."""

import base64
import ssl

import anthropic
import openai
import pytest
from documents import blank_pdf

from agentkeys.pricing import Usage, cost_micros
from agentkeys.providers.anthropic import IMAGE_TOKEN_ALLOWANCE as ANTHROPIC_IMAGE_TOKENS
from agentkeys.providers.documents import PDF_PAGE_TEXT_TOKENS
from agentkeys.providers.openai import IMAGE_TOKEN_ALLOWANCE as OPENAI_IMAGE_TOKENS
from conftest import assert_metered, billed, httpx, settled, write_policy
from mock_provider.documents import PAGE_TEXT_TOKENS
from prices import price_of

FREE_SIDE_TRAFFIC = [
    "POST /v1/traces/ingest",
    "POST /v1/conversations",
    "GET /v1/conversations/*",
    "DELETE /v1/conversations/*",
    "GET /v1/conversations/*/items",
    "POST /v1/conversations/*/items",
]
ENDPOINTS = ["POST /v1/responses", "POST /v1/responses/compact", "POST /v1/chat/completions", *FREE_SIDE_TRAFFIC]
DATA_URL = "data:application/pdf;base64,"
# What the Agents SDK's BackendSpanExporter posts at the end of a run.
TRACE_BATCH = {"data": [{"object": "trace", "id": "trace_0123456789abcdef", "workflow_name": "Agent workflow"}]}


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policies")
    return {
        "agents": write_policy(folder, "agents", endpoints=[*ENDPOINTS, "POST /v1/messages"], max_output_tokens=512),
        "models-only": write_policy(folder, "models-only", endpoints=["POST /v1/responses"]),
    }


@pytest.fixture()
def key(proxy, policies):
    return proxy.issue(policies["agents"])


def gateway_client(proxy, key) -> openai.OpenAI:
    return openai.OpenAI(api_key=key["key"], base_url=f"{proxy.gateway_url}/openai/v1", max_retries=0)


def post_trace(proxy, key) -> httpx.Response:
    """The trace export as the Agents SDK sends it in proxy mode: to api.openai.com, through HTTPS_PROXY."""
    with httpx.Client(proxy=proxy.proxy_url, verify=ssl.create_default_context(cafile=proxy.ca_bundle)) as client:
        return client.post(
            "https://api.openai.com/v1/traces/ingest",
            json=TRACE_BATCH,
            headers={"authorization": f"Bearer {key['key']}", "openai-beta": "traces=v1"},
            timeout=10,
        )


# ----- side traffic -----


def test_agents_sdk_traces_pass_free_in_proxy_mode(proxy, mock, key):
    answer = post_trace(proxy, key)
    assert answer.status_code == 204, answer.text
    assert mock.contexts.traces == [TRACE_BATCH]
    assert mock.received[-1].headers["authorization"] == "Bearer sk-test-real-openai"
    record = settled(proxy, key)
    assert (record["decision"], record["metering"], record["cost_micros"]) == ("allow", "free", 0)


def test_traces_a_policy_does_not_list_are_refused_by_the_policy_not_as_unmeterable(proxy, mock, policies):
    key = proxy.issue(policies["models-only"])
    answer = post_trace(proxy, key)
    assert answer.status_code == 403
    message = answer.json()["error"]["message"]
    assert "POST /v1/traces/ingest is not allowed by policy models-only" in message
    assert "cannot be metered" not in message and mock.received == []


def test_the_conversations_api_objects_are_free(proxy, mock, key):
    client = gateway_client(proxy, key)
    conversation = client.conversations.create(items=[{"role": "user", "content": "Remember: blue."}])
    client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "And green."}])
    items = client.conversations.items.list(conversation.id)
    assert [item.content for item in items.data][-1] == "And green."
    assert client.conversations.delete(conversation.id).deleted
    records = proxy.records_for(key["id"], 4)
    assert [(r["method"], r["metering"], r["cost_micros"]) for r in records] == [
        ("POST", "free", 0), ("POST", "free", 0), ("GET", "free", 0), ("DELETE", "free", 0)
    ]  # fmt: skip
    settled(proxy, key, 4)


# ----- tools -----

FUNCTION = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
CLIENT_RUN_TOOLS = {
    "shell-local": {"type": "shell", "environment": {"type": "local"}},
    "shell": {"type": "shell"},
    "computer": {"type": "computer"},
    "computer-preview": {"type": "computer_use_preview", "display_width": 1024, "display_height": 768,
                         "environment": "linux"},
    "namespace": {"type": "namespace", "name": "crm", "description": "the CRM", "tools": [FUNCTION]},
    "apply-patch": {"type": "apply_patch"},
}  # fmt: skip


@pytest.mark.parametrize("tool", CLIENT_RUN_TOOLS.values(), ids=CLIENT_RUN_TOOLS.keys())
def test_tools_the_client_runs_cost_only_tokens_and_are_metered(proxy, mock, key, tool):
    client = gateway_client(proxy, key)
    client.responses.create(model="gpt-4o-mini", input="list the files", tools=[tool], max_output_tokens=20)
    assert mock.received[-1].json["tools"] == [tool]
    usage = billed(mock)
    assert_metered(settled(proxy, key), usage, cost_micros(price_of("gpt-4o-mini", "openai"), usage))


HOSTED_TOOLS = {
    "shell-container": ({"type": "shell", "environment": {"type": "container_auto"}}, "billed per use"),
    "web-search": ({"type": "web_search"}, "hosted tool 'web_search' is billed per use"),
    "code-interpreter": ({"type": "code_interpreter", "container": {"type": "auto"}}, "billed per use"),
    "namespace-with-a-hosted-tool": (
        {"type": "namespace", "name": "mixed", "tools": [FUNCTION, {"type": "file_search"}]},
        "'file_search'",
    ),
    "unknown": ({"type": "teleport"}, "the tool type 'teleport' is not one this proxy knows to cost only tokens"),
}


@pytest.mark.parametrize(("tool", "complaint"), HOSTED_TOOLS.values(), ids=HOSTED_TOOLS.keys())
def test_hosted_and_unknown_tools_are_refused_saying_why(proxy, mock, key, tool, complaint):
    with pytest.raises(openai.PermissionDeniedError) as refused:
        gateway_client(proxy, key).responses.create(model="gpt-4o-mini", input="hi", tools=[tool], max_output_tokens=5)
    assert complaint in refused.value.message and mock.received == []


# ----- compaction -----


def test_compaction_is_metered_as_a_model_call_held_at_the_models_output_limit(proxy, mock, key):
    client = gateway_client(proxy, key)
    compacted = client.responses.compact(model="gpt-4o-mini", input=[{"role": "user", "content": "A long chat."}])
    assert compacted.output[0].type == "compaction"
    assert "max_output_tokens" not in mock.received[-1].json, "the endpoint takes no output limit"
    usage, price = billed(mock), price_of("gpt-4o-mini", "openai")
    record = settled(proxy, key)
    assert_metered(record, usage, cost_micros(price, usage))
    assert record["hold_micros"] >= cost_micros(price, Usage(0, price.max_output_tokens)), (
        "the policy's 512-token ceiling cannot be sent, so the model's own limit is held"
    )


def test_compaction_is_refused_where_the_policy_does_not_list_it(proxy, mock, policies):
    key = proxy.issue(policies["models-only"])
    with pytest.raises(openai.PermissionDeniedError) as refused:
        gateway_client(proxy, key).responses.compact(model="gpt-4o-mini", input="hi")
    assert "POST /v1/responses/compact is not allowed by policy models-only" in refused.value.message


# ----- documents: one rule in every format -----

PDF = base64.b64encode(blank_pdf(2)).decode()
PDF_FILE = {"filename": "a.pdf", "file_data": DATA_URL + PDF}
PDF_SOURCE = {"type": "base64", "media_type": "application/pdf", "data": PDF}
PDF_PARTS = {
    "chat-file": ("openai", "chat", {"type": "file", "file": PDF_FILE}),
    "responses-input-file": ("openai", "responses", {"type": "input_file", **PDF_FILE}),
    "anthropic-document": ("anthropic", "messages", {"type": "document", "source": PDF_SOURCE}),
}


def send_document(proxy, key, api: str, part: dict):
    if api == "messages":
        client = anthropic.Anthropic(api_key=key["key"], base_url=f"{proxy.gateway_url}/anthropic", max_retries=0)
        content = [part, {"type": "text", "text": "Summarise."}]
        return client.messages.create(model="claude-haiku-4-5", max_tokens=20, messages=[user(content)])
    client = gateway_client(proxy, key)
    if api == "chat":
        return client.chat.completions.create(model="gpt-4o-mini", max_tokens=20, messages=[user([part])])
    content = [part, {"type": "input_text", "text": "Summarise."}]
    return client.responses.create(model="gpt-4o-mini", max_output_tokens=20, input=[user(content)])


def user(content) -> dict:
    return {"role": "user", "content": content}


@pytest.mark.parametrize(("provider", "api", "part"), PDF_PARTS.values(), ids=PDF_PARTS.keys())
def test_an_inline_pdf_is_held_by_its_pages_and_metered(proxy, mock, key, provider, api, part):
    send_document(proxy, key, api, part)
    usage, price = billed(mock), price_of("gpt-4o-mini" if provider == "openai" else "claude-haiku-4-5", provider)
    assert usage.input_tokens > 2 * PAGE_TEXT_TOKENS, "the mock billed the pages"
    record = settled(proxy, key)
    assert_metered(record, usage, cost_micros(price, usage))
    image = {"openai": OPENAI_IMAGE_TOKENS, "anthropic": ANTHROPIC_IMAGE_TOKENS}[provider]
    pages_held = cost_micros(price, Usage(2 * (image + PDF_PAGE_TEXT_TOKENS), 0))
    assert pages_held <= record["hold_micros"] < pages_held + cost_micros(price, Usage(5_000, 20))


def test_a_file_only_the_provider_can_read_is_held_at_the_context_window(proxy, mock, key):
    part = {"type": "input_file", "file_id": "file-abc123"}
    send_document(proxy, key, "responses", part)
    price = price_of("gpt-4o-mini", "openai")
    record = settled(proxy, key)
    assert record["hold_micros"] >= cost_micros(price, Usage(price.max_input_tokens, 20))
