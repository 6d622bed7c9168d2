"""Azure OpenAI (providers/azure.py): a deployment path names the model; the real key is an api-key header."""

from agentkeys.providers import FORMATS

AZURE = FORMATS["azure"]


def test_an_azure_deployment_path_names_the_model_whatever_the_body_says():
    body = b'{"model": "cheap-model", "messages": [{"role": "user", "content": "hi"}]}'
    facts = AZURE.request_facts("POST", "/openai/deployments/prod-4o/chat/completions", body, "api-version=x")
    assert facts.model == "prod-4o" and facts.endpoint == "/v1/chat/completions"
    assert AZURE.real_key_header("real") == ("api-key", "real")
