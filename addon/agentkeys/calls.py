"""The plain data of one call, as the adapter hands it to the gate and back (no mitmproxy here).

CallRequest  what the agent sent, in the provider's own terms
Denial       why the proxy answers instead of the provider (raised by any step of the gate)
Outcome      what became of a forwarded call: the facts the settlement rules decide from
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentkeys.ledger import KeyRecord
from agentkeys.pricing import Usage
from agentkeys.providers.base import DenyKind, StoredResponse, StreamResult

if TYPE_CHECKING:
    from agentkeys.shadow import Rule


@dataclass(frozen=True)
class CallRequest:
    """One request as the agent sent it, with the path in the provider's own terms."""

    provider: str
    method: str
    path: str
    headers: dict[str, str]  # the credential headers it carries (lower-cased names; see CREDENTIAL_HEADERS)
    body: bytes
    query: str = ""
    tunnel_credential: str | None = None


class Denial(Exception):
    """A call refused: which kind of refusal (each wire format turns it into its own status and error
    shape), a message for the agent, and what the audit record names."""

    def __init__(
        self,
        kind: DenyKind,
        message: str,
        key: KeyRecord | None = None,
        model: str | None = None,
        presented_key_id: str | None = None,  # the id in a key the store does not know (forged, or purged)
        remaining_micros: int | None = None,  # what the key had left when refused, if fresher than `key`'s
        rule: "Rule | None" = None,  # the policy rule it enforces, which shadow mode may waive (shadow.Rule)
        retry_after: float | None = None,  # seconds after which the same call could pass (a rate limit)
    ):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.key = key
        self.model = model
        self.presented_key_id = presented_key_id
        self.remaining_micros = remaining_micros
        self.rule = rule
        self.retry_after = retry_after


@dataclass(frozen=True)
class Outcome:
    """What happened to a forwarded call, in plain facts; the gate decides what it costs from them."""

    reached_provider: bool  # the request was sent on to the provider, which may bill it from then on
    complete: bool  # the provider's response arrived in full (a stream: to its end)
    status: int | None = None  # the provider's status, if its response headers arrived
    usage: Usage | None = None  # of a whole (not streamed) response, as the provider reported it
    usage_rejected: str | None = None  # why a whole response's usage was not believed (providers.base.UsageRejected)
    stream: StreamResult | None = None  # what the meter read from a relayed stream
    meter_broken: bool = False  # the stream meter failed part-way; what it read cannot be trusted
    stored: StoredResponse | None = None  # the response a whole answer says the provider keeps
    note: str = ""  # what the adapter saw go wrong, for the audit record
