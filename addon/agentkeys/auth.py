"""Who is calling: the one scoped key a request carries, checked against the store.

Used by the gate (every provider call) and by the control API (the proxy's own routes). A real
provider key in a request is refused outright: an agent must never hold one.
"""

import logging
from collections.abc import Callable

from agentkeys import credentials
from agentkeys.calls import CallRequest, Denial
from agentkeys.ledger import KeyRecord
from agentkeys.providers.base import DenyKind
from agentkeys.seal import altered_message
from agentkeys.shadow import Rule
from agentkeys.store import Store

log = logging.getLogger(__name__)


class Authenticator:
    def __init__(self, store: Store, real_keys: frozenset[str], clock: Callable[[], float]):
        self.store = store
        self.real_keys = real_keys
        self.clock = clock

    async def caller(self, call: CallRequest, fresh: bool = False) -> KeyRecord:
        """The record of the active key the call carries; Denial otherwise.

        `fresh` reads the record from the store rather than the cache: needed wherever no hold will
        ask the store whether the key is still active (a revocation a moment ago).
        """
        key = self.presented_key(call)
        key_id = credentials.key_id_of(key)
        record = await (self.store.key(key_id) if fresh else self.store.known_key(key_id))
        self.check(key, record)
        return record

    def presented_key(self, call: CallRequest) -> str:
        """The one scoped key the request carries; a real provider key or none at all is refused."""
        found = credentials.credentials_in(call.headers) + credentials.credentials_in_query(call.query)
        if call.tunnel_credential:
            found.append(call.tunnel_credential)
        if any(credential in self.real_keys for credential in found):
            raise Denial(DenyKind.UNAUTHENTICATED, "agentkeys: a real provider key was sent; use a scoped ak_ key")
        scoped = {credential for credential in found if credentials.key_id_of(credential)}
        if not scoped and any(credential.startswith(credentials.PREFIX) for credential in found):
            raise Denial(DenyKind.UNAUTHENTICATED, f"agentkeys: malformed agent key; {credentials.KEY_SHAPE}")
        if not scoped:
            raise Denial(
                DenyKind.UNAUTHENTICATED,
                "agentkeys: no agent key; send your ak_… key as the API key or as the HTTPS_PROXY user",
            )
        if len(scoped) > 1:
            raise Denial(DenyKind.UNAUTHENTICATED, "agentkeys: the request carries two different agent keys")
        return scoped.pop()

    def secrets_in_play(self, call: CallRequest) -> list[str]:
        """Every key an answer to this call must never show the agent: the real keys, and its own."""
        presented = credentials.credentials_in(call.headers) + credentials.credentials_in_query(call.query)
        if call.tunnel_credential:
            presented.append(call.tunnel_credential)
        return [*self.real_keys, *presented]

    def check(self, key: str, record: KeyRecord | None) -> None:
        """The key must be the one the record was made for, the record one a proxy made (sealed), and the key
        still active."""
        if record is None or not credentials.matches(key, record.key_hash):
            raise Denial(
                DenyKind.UNAUTHENTICATED, "agentkeys: unknown agent key", presented_key_id=credentials.key_id_of(key)
            )
        if not self.store.trusts(record):
            self.store.forget(record.key_id)
            log.error("key %s: its record in the store fails its seal: refused", record.key_id)
            raise Denial(DenyKind.UNAUTHENTICATED, altered_message(record.key_id), record)
        status = record.status(self.clock())
        if status != "active":
            rule = Rule.EXPIRED if status == "expired" else None  # a revocation is never waived, even in shadow
            message = f"agentkeys: agent key {record.key_id} is {status}"
            raise Denial(DenyKind.UNAUTHENTICATED, message, record, rule=rule)
