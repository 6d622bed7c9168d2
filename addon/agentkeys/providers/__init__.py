"""Wire formats by name. Adding a provider's format is one module here and one line below."""

from agentkeys.providers import anthropic, azure, gemini, openai
from agentkeys.providers.base import WireFormat

FORMATS: dict[str, WireFormat] = {
    "openai": openai.FORMAT,
    "anthropic": anthropic.FORMAT,
    "gemini": gemini.FORMAT,
    "azure": azure.FORMAT,
}
