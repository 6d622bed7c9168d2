"""Build the package's price table from LiteLLM's model price map.

Prices are facts, so we derive ours from the reference map instead of typing them:

    python tools/build_prices.py ../shared/data/pricing/litellm_model_prices.json

writes `addon/agentkeys/data/prices.json`, keyed by our provider name and then model name,
keeping only what metering needs (per-token prices and the output-token ceiling).
"""

import json
import sys
from pathlib import Path

from agentkeys.pricing import price_from_litellm_entry

# LiteLLM's provider name -> ours. Only providers whose wire formats we speak.
PROVIDERS = {
    "openai": "openai",
    "text-completion-openai": "openai",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "azure": "azure",
    "groq": "groq",
    "mistral": "mistral",
    "deepseek": "deepseek",
    "together_ai": "together",
    "openrouter": "openrouter",
}

OUTPUT = Path(__file__).resolve().parent.parent / "addon" / "agentkeys" / "data" / "prices.json"


def build(litellm_map: dict) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    for name, entry in litellm_map.items():
        if not isinstance(entry, dict) or entry.get("litellm_provider") not in PROVIDERS:
            continue
        price = price_from_litellm_entry(entry)
        if price is None:
            continue
        provider = PROVIDERS[entry["litellm_provider"]]
        model = name.split("/", 1)[1] if "/" in name and name.split("/", 1)[0] in PROVIDERS else name
        table.setdefault(provider, {})[model] = price.model_dump(exclude_none=True)
    return {provider: dict(sorted(models.items())) for provider, models in sorted(table.items())}


if __name__ == "__main__":
    source = Path(sys.argv[1])
    table = build(json.loads(source.read_text()))
    OUTPUT.write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
    print(f"{OUTPUT}: {sum(len(m) for m in table.values())} models from {source.name}")
