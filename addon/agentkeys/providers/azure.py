"""Azure OpenAI: OpenAI's bodies, usage and errors on Azure's paths, with the key in `api-key`.

Two path styles reach the same endpoints:

    /openai/deployments/{deployment}/chat/completions?api-version=…   the deployment names the model
    /openai/v1/chat/completions, /openai/v1/responses, …             the body's `model` names the deployment

Azure bills by the model a deployment runs, whatever the body says, so the model is always the
deployment's name (on deployment paths the body's `model` is ignored, as Azure ignores it). The
gate maps a deployment name to the model it serves when the provider config says so
(`deployments: {prod-4o: gpt-4o}`); otherwise the name itself is priced and matched by the policy.
"""

import re

from agentkeys.providers import openai
from agentkeys.providers.base import RequestFacts, Unmeterable, kind_of_endpoint, parse_json_object

DEPLOYMENT_PATH = re.compile(
    r"^/openai/deployments/(?P<deployment>[^/]+)(?P<endpoint>/chat/completions|/completions|/embeddings)$"
)
V1_PATHS = {
    "/openai/v1/chat/completions": openai.CHAT,
    "/openai/v1/completions": openai.COMPLETIONS,
    "/openai/v1/embeddings": openai.EMBEDDINGS,
    "/openai/v1/responses": openai.RESPONSES,
    "/openai/responses": openai.RESPONSES,  # the preview Responses API, with ?api-version=
}
FREE = [
    ("GET", "/openai/models"),
    ("GET", "/openai/v1/models"),
    ("GET", "/openai/v1/models/*"),
    ("GET", "/openai/v1/responses/*"),
    ("GET", "/openai/v1/responses/*/input_items"),
    ("GET", "/openai/responses/*"),
    ("GET", "/openai/responses/*/input_items"),
    ("DELETE", "/openai/v1/responses/*"),
    ("DELETE", "/openai/responses/*"),
]


class AzureFormat(openai.OpenAIFormat):
    name = "azure"

    def endpoint_kind(self, method: str, path: str) -> str | None:
        if method == "POST" and route(path) is not None:
            return "metered"
        return kind_of_endpoint(method, path, [], FREE)

    def request_facts(self, method: str, path: str, body: bytes, query: str = "", exact: bool = False) -> RequestFacts:
        found = route(path) if method == "POST" else None
        if found is None:
            return RequestFacts(metered=False)
        endpoint, deployment = found
        data = parse_json_object(body)
        if data.get("data_sources"):
            raise Unmeterable(
                "'data_sources' (On Your Data) adds retrieved input and search fees, so this proxy cannot meter it"
            )
        return openai.read_endpoint(endpoint, {**data, "model": deployment} if deployment else data, exact)

    def real_key_header(self, key: str) -> tuple[str, str]:
        return "api-key", key


def route(path: str) -> tuple[str, str | None] | None:
    """(the OpenAI endpoint, the deployment named by the path, if any), or None for an unmetered path."""
    match = DEPLOYMENT_PATH.match(path)
    if match:
        return "/v1" + match["endpoint"], match["deployment"]
    endpoint = V1_PATHS.get(path)
    return (endpoint, None) if endpoint else None


FORMAT = AzureFormat()
