"""Azure OpenAI: OpenAI's wire formats under other paths and another key.

A deployment path (``/openai/deployments/{deployment}/…?api-version=``) names its model; the v1 API
(``/openai/v1/…``) takes the model from the body. The key is an ``api-key`` header.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from mock_provider import openai

if TYPE_CHECKING:
    from mock_provider.server import MockProvider

DEPLOYMENT = re.compile(
    r"^/openai/deployments/(?P<deployment>[^/]+)(?P<endpoint>/chat/completions|/completions|/embeddings)$"
)


def authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
    return headers.get("api-key") == mock_provider.azure_key


def v1_authorized(headers: dict[str, str], mock_provider: MockProvider) -> bool:
    """`/openai/v1/…`: Azure's v1 API (an `api-key`, or a bearer token), or a host such as Groq mounted there."""
    return authorized(headers, mock_provider) or openai.authorized(headers, mock_provider)
