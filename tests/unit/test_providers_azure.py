"""Azure OpenAI (providers/azure.py): a deployment path names the model; the real key is an api-key header."""

import json

import pytest

from agentkeys.providers import FORMATS
from agentkeys.providers.base import Unmeterable
from agentkeys.tokens import EXACT_COUNT_CHARS, count_tokens

AZURE = FORMATS["azure"]


def test_an_azure_deployment_path_names_the_model_whatever_the_body_says():
    body = b'{"model": "cheap-model", "messages": [{"role": "user", "content": "hi"}]}'
    facts = AZURE.request_facts("POST", "/openai/deployments/prod-4o/chat/completions", body, "api-version=x")
    assert facts.model == "prod-4o" and facts.endpoint == "/v1/chat/completions"
    assert AZURE.real_key_header("real") == ("api-key", "real")


CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def facts_of(path: str, body: dict, method: str = "POST", exact: bool = False):
    return AZURE.request_facts(method, path, json.dumps(body).encode(), "api-version=x", exact)


@pytest.mark.parametrize(
    ("path", "endpoint", "model"),
    [
        ("/openai/deployments/d1/chat/completions", "/v1/chat/completions", "d1"),
        ("/openai/deployments/d1/completions", "/v1/completions", "d1"),
        ("/openai/v1/chat/completions", "/v1/chat/completions", "gpt-4o-mini"),  # the v1 API: the body names it
        ("/openai/v1/responses", "/v1/responses", "gpt-4o-mini"),
        ("/openai/responses", "/v1/responses", "gpt-4o-mini"),
    ],
)
def test_each_metered_path_reads_as_its_openai_endpoint(path, endpoint, model):
    body = {**CHAT_BODY, "prompt": "hi", "input": "hi"}
    facts = facts_of(path, body)
    assert (facts.metered, facts.endpoint, facts.model) == (True, endpoint, model)
    assert AZURE.endpoint_kind("POST", path) == "metered"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/openai/deployments/d1/chat/completions"), ("GET", "/openai/models"),
     ("POST", "/openai/deployments/d1/images/generations"), ("POST", "/openai/v1/files")],
)  # fmt: skip
def test_anything_else_is_not_metered(method, path):
    assert facts_of(path, CHAT_BODY, method).metered is False


def test_on_your_data_is_refused():
    with pytest.raises(Unmeterable) as refused:
        facts_of("/openai/deployments/d1/chat/completions", {**CHAT_BODY, "data_sources": [{"type": "x"}]})
    assert str(refused.value) == (
        "'data_sources' (On Your Data) adds retrieved input and search fees, so this proxy cannot meter it"
    )


def test_an_exact_count_is_passed_on_to_the_openai_reader():
    long_text = "word " * (EXACT_COUNT_CHARS // 5 + 100)
    body = {"model": "gpt-4o-mini", "input": long_text}
    cheap = facts_of("/openai/v1/embeddings", body).input_token_bound
    exact = facts_of("/openai/v1/embeddings", body, exact=True).input_token_bound
    assert (cheap, exact) == (len(long_text.encode()) + 1 + 1, count_tokens(long_text, "gpt-4o-mini") + 1)
