"""Build the package's price table from LiteLLM's model price map.

Prices are facts, so we derive ours from the reference map instead of typing them:

    python tools/build_prices.py ../shared/data/pricing/litellm_model_prices.json

writes `addon/agentkeys/data/prices.json`, keyed by our provider name and then model name,
keeping only what metering needs (per-token prices, long-context bands, the token limits, and why a
model cannot be metered by its tokens: `unmeterable`, which the gate refuses).
"""

import json
import sys
from pathlib import Path

from agentkeys.pricing import LITELLM_PROVIDERS, litellm_model_name, price_from_litellm_entry

OUTPUT = Path(__file__).resolve().parent.parent / "addon" / "agentkeys" / "data" / "prices.json"


def build(litellm_map: dict) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    for name, entry in litellm_map.items():
        if not isinstance(entry, dict) or entry.get("litellm_provider") not in LITELLM_PROVIDERS:
            continue
        price = price_from_litellm_entry(entry, name=name)
        if price is None:
            continue
        provider = LITELLM_PROVIDERS[entry["litellm_provider"]]
        table.setdefault(provider, {})[litellm_model_name(name)] = price.model_dump(
            exclude_none=True, exclude_defaults=True
        )
    return {provider: dict(sorted(models.items())) for provider, models in sorted(table.items())}


if __name__ == "__main__":
    source = Path(sys.argv[1])
    table = build(json.loads(source.read_text()))
    OUTPUT.write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
    print(f"{OUTPUT}: {sum(len(m) for m in table.values())} models from {source.name}")
