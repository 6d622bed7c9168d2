"""Real provider keys still in use (`real_keys: audit`), for a security team's migration list (no mitmproxy here).

By default a request carrying a real provider key is refused: an agent must hold a scoped key. With
`real_keys: audit`, a provider call that carries no agent key but some other credential is passed on
untouched (its credentials, body and query as sent) and recorded with the key's fingerprint, never
the key: the provider, a prefix of its SHA-256 and its last four characters, enough to tell keys
apart and for the key's owner to recognise theirs. The proxy meters what it can from the provider's
usage (tokens, and the cost at its prices), but charges no budget: the key's owner pays the provider.
"""

import hashlib
from dataclasses import dataclass

from agentkeys import credentials
from agentkeys.calls import CallRequest, Denial, Outcome
from agentkeys.gate import Gate
from agentkeys.pricing import ModelPrice, Usage, cost_micros
from agentkeys.providers import FORMATS
from agentkeys.providers.base import RequestFacts

HASH_PREFIX_CHARS = 12  # 48 bits of SHA-256: keys told apart, and nothing of a high-entropy key given away
SHOWN_TAIL = 4
SHORTEST_WITH_TAIL = 16  # a shorter credential shows no characters at all


@dataclass(frozen=True)
class RealKeyCall:
    """A call passed on untouched with a real key: who to name, and what to meter its usage with."""

    fingerprint: str
    host: str  # the host the client addressed: the provider's in proxy mode, the gateway's on the gateway
    facts: RequestFacts | None  # None: the request could not be read (it is forwarded as sent all the same)
    price: ModelPrice | None  # None: no price known (or not a billed call): tokens recorded, no cost


def fingerprint(provider: str, key: str) -> str:
    """`openai:3f9a0c1e2b4d…WXYZ`: the provider, a hash prefix and the last four characters; never the key."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:HASH_PREFIX_CHARS]
    tail = key[-SHOWN_TAIL:] if len(key) >= SHORTEST_WITH_TAIL else ""
    return f"{provider}:{digest}…{tail}"


def real_key_in(call: CallRequest) -> str | None:
    """The credential of a call that carries no agent key but some other one (a real provider key), else None."""
    found = credentials.credentials_in(call.headers) + credentials.credentials_in_query(call.query)
    if call.tunnel_credential:
        found.append(call.tunnel_credential)
    if not found or any(credential.startswith(credentials.PREFIX) for credential in found):
        return None
    return found[0]


async def observe(gate: Gate, call: CallRequest, host: str) -> RealKeyCall | None:
    """With `real_keys: audit`, what to record of a call carrying a real key; None for any other call."""
    if gate.config.real_keys != "audit":
        return None
    key = real_key_in(call)
    if key is None:
        return None
    wire = FORMATS[gate.config.providers[call.provider].format]
    named = fingerprint(call.provider, key)
    if len(call.body) > gate.config.max_request_bytes:  # not read: passed on as sent, recorded without a model
        return RealKeyCall(named, host, None, None)
    try:
        facts = await gate.read_request(call, wire, None)
    except Denial:
        return RealKeyCall(named, host, None, None)
    match = gate.prices.find(facts.model, call.provider, wire.name) if facts.metered and facts.model else None
    price = match.price if match and not match.price.unmeterable else None
    return RealKeyCall(named, host, facts, price)


def usage_and_cost(observed: RealKeyCall, outcome: Outcome) -> tuple[Usage | None, int, str]:
    """The usage the provider reported, its cost at the proxy's prices, and why there is none when not."""
    usage = outcome.stream.usage if outcome.stream else outcome.usage
    if outcome.status is not None and outcome.status >= 400:
        return usage, 0, f"the provider answered {outcome.status}"
    if usage is None:
        return None, 0, "the response carried no usage the proxy could read" if outcome.complete else outcome.note
    if observed.price is None:
        return usage, 0, "no price is known for this model"
    return usage, cost_micros(observed.price, usage), ""
