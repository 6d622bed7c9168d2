"""Key records sealed with a secret the proxies hold, so the store cannot grant what they did not.

Whoever can write to the store (Redis, or the SQLite file) could otherwise plant a record for a key
they hold, with any policy and budget, or raise a key's budget, and be obeyed. Each record is sealed
when a proxy (or the CLI) creates it: an HMAC-SHA256, under the store secret, over the fields that
never change (who the key is, its policy, its budget, its lifetime, its place in a tree, its account). A record
whose seal does not match is refused, and the refusal audited. Spend, holds and revocation change
with every call and are not sealed: the store is trusted with them (see docs/hardening.md).

The secret is `AGENTKEYS_STORE_SECRET` when set (give every replica on one Redis the same one), else
the file `store.secret` in the proxy's certs folder, made on first use, owner-only.
"""

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import replace
from pathlib import Path

from agentkeys.ledger import KeyRecord
from agentkeys.private import FILE_MODE

SECRET_ENV = "AGENTKEYS_STORE_SECRET"
SECRET_FILE = "store.secret"
SEALED_FIELDS = (
    "key_id", "key_hash", "name", "policy_name", "policy_json", "created_at", "expires_at", "budget_micros",
    "parent_id", "depth", "identity_json", "account_id",
)  # fmt: skip


class RecordSeal:
    def __init__(self, secret: bytes):
        self._secret = secret

    def sealed(self, record: KeyRecord) -> KeyRecord:
        return replace(record, seal=self._mac(record))

    def intact(self, record: KeyRecord) -> bool:
        return record.seal is not None and hmac.compare_digest(record.seal, self._mac(record))

    def _mac(self, record: KeyRecord) -> str:
        fields = json.dumps([getattr(record, name) for name in SEALED_FIELDS], separators=(",", ":"))
        return hmac.new(self._secret, fields.encode(), hashlib.sha256).hexdigest()


def altered_message(key_id: str) -> str:
    """What a call on a key whose record fails its seal is told (and its audit record says)."""
    return (f"agentkeys: the store's record of agent key {key_id} was altered outside the proxy (it no longer"
            " matches its seal); the key is refused until its record is restored or the key reissued")  # fmt: skip


def store_seal(certs_dir: Path) -> RecordSeal:
    """The seal of this config's store: its secret from the environment, else from the certs folder."""
    given = os.environ.get(SECRET_ENV)
    if given:
        return RecordSeal(given.encode())
    path = certs_dir / SECRET_FILE
    if not path.exists():
        certs_dir.mkdir(parents=True, exist_ok=True)
        _create_secret(path)
    return RecordSeal(path.read_bytes().strip())


def _create_secret(path: Path) -> None:
    """Written aside and linked into place: processes starting together each make it or read the one made."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with open(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE), "w") as file:
        file.write(secrets.token_hex(32))
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
