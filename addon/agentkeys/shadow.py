"""Shadow mode: the policy rules a call breaks, noted instead of enforced (no mitmproxy here).

Enforcement is switched on in steps. In shadow (`enforcement: shadow`, in the proxy config or a
policy), the gate computes every decision as it would when enforcing, but a call that only a *policy
rule* refuses is forwarded all the same, metered and charged as usual, and audited
`decision: would_deny` with each rule it broke. Everything the proxy needs to forward a call safely
is still enforced, since without it the call would be forwarded unmetered, unbounded or by nobody:
an unknown, forged, malformed or revoked key; a real provider key; a body too large, unreadable or
that the proxy cannot meter; a model without a price; a provider without a real key; a store that
cannot be reached (docs/security-teams.md says why for each).
"""

from dataclasses import dataclass, field
from enum import Enum

from agentkeys.calls import Denial


class Rule(Enum):
    """A policy rule that shadow mode notes instead of enforcing (a refusal's `rule`; the metric's reason)."""

    PROVIDER = "provider"  # the policy does not list the provider
    ENDPOINT = "endpoint"  # nor the endpoint (one the proxy can meter)
    MODEL = "model"  # nor the model
    BUDGET = "budget"  # the key's budget does not cover the call's worst case
    EXPIRED = "expired"  # the key's lifetime is over (until it is purged from the store)


@dataclass
class Rulings:
    """The policy rules one call broke. Enforcing (`shadow` false), the first refuses the call; in
    shadow each is noted and the call goes on. A refusal that is not a policy rule always refuses."""

    shadow: bool
    broken: list[Denial] = field(default_factory=list)

    def check(self, step, *args):
        """`step(*args)`, whose refusal is noted rather than raised when it may be."""
        try:
            return step(*args)
        except Denial as denial:
            self.note(denial)
            return None

    def note(self, denial: Denial) -> None:
        """Note a refusal in shadow, if it is a policy rule's (once per rule); else raise it."""
        if not (self.shadow and denial.rule):
            raise denial
        if all(noted.rule is not denial.rule for noted in self.broken):
            self.broken.append(denial)
