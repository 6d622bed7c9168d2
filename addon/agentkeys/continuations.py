"""Continuations: what a call continuing a stored response (`previous_response_id`) or a conversation
brings in, bounded by what this proxy measured of it rather than by the model's whole context window.

After each call that leaves a stored response, the proxy keeps (in the store, so every replica knows
it) the tokens that response will bring into a call continuing it: its input and output from the
provider's usage, plus each output item's framing. A conversation is measured the same way, by its
last response; items added to it by a free call make it unmeasured again. What the proxy never
measured is input only the provider sees, held at the context window (gate.bound_unseen_input).
"""

import dataclasses

from agentkeys.calls import Outcome
from agentkeys.providers.base import RequestFacts
from agentkeys.store import Store


def context_ref(provider: str, field: str, name: str) -> str:
    """The store's name for what `field` (previous_response_id, conversation) = `name` names at `provider`."""
    return f"{provider}:{field}:{name}"


async def bounded(store: Store, provider: str, facts: RequestFacts) -> RequestFacts:
    """The facts with what the continuation brings in: the measured context, else named as unseen input."""
    if facts.continues is None:
        return facts
    field, name = facts.continues
    known = await store.context_tokens(context_ref(provider, field, name))
    if known is None:
        unseen = ", ".join(sorted(filter(None, [facts.unseen_input, field])))
        return dataclasses.replace(facts, unseen_input=unseen)
    return dataclasses.replace(facts, input_token_bound=facts.input_token_bound + known)


async def forget_additions(store: Store, provider: str, facts: RequestFacts) -> None:
    """A free call adding items to a conversation: unmeasured from now (and again once the items are in)."""
    if facts.adds_to_conversation:
        await store.forget_context(context_ref(provider, "conversation", facts.adds_to_conversation))


async def remember(store: Store, provider: str, facts: RequestFacts, admitted_at: float, outcome: Outcome) -> None:
    """After a call: keep what its stored response (and the conversation it went into) will bring into a call
    continuing it. A measurement by a call admitted before the latest addition is not kept (Ledger.learn_context)."""
    if facts.adds_to_conversation:
        await forget_additions(store, provider, facts)
        return
    stored = outcome.stream.stored if outcome.stream else outcome.stored
    usage = outcome.stream.usage if outcome.stream else outcome.usage
    if stored is None or usage is None or outcome.meter_broken or (outcome.status or 0) >= 400:
        return
    tokens = usage.input_tokens + usage.output_tokens + stored.item_overhead_tokens
    refs = [("previous_response_id", stored.response_id)]
    if facts.conversation:
        refs.append(("conversation", facts.conversation))
    for field, name in refs:
        await store.learn_context(context_ref(provider, field, name), tokens, admitted_at)
