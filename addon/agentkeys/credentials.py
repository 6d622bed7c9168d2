"""Scoped keys: their format, minting, hashing, and finding one in a request's headers.

A key reads `ak_<id>_<secret>`. The id names the key in the ledger, the CLI and the audit log;
the secret is 32 random bytes. Only the SHA-256 of the whole key is stored, so a copy of the
store does not hand out working keys. (The secret is high-entropy, so a salted slow hash would
add cost without adding safety.)
"""

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from urllib.parse import unquote_plus

PREFIX = "ak_"
# What `mint` makes: an id of letters and digits, a URL-safe secret. Anything else is refused before
# it is looked up or hashed (a byte that is not UTF-8 arrives as a lone surrogate, which cannot be).
KEY_FORMAT = re.compile(r"ak_([0-9A-Za-z]+)_[0-9A-Za-z_-]+")
KEY_SHAPE = "an agent key reads ak_<id>_<secret>, in letters, digits, '-' and '_'"
# Headers through which SDKs send an API key. All are stripped before forwarding.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key", "proxy-authorization")
# Query parameters through which an API key travels (Google's `?key=`). Also stripped before forwarding.
CREDENTIAL_QUERY_PARAMS = ("key",)


@dataclass(frozen=True)
class MintedKey:
    key_id: str
    key: str
    key_hash: str


def mint() -> MintedKey:
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return MintedKey(key_id=key_id, key=key, key_hash=hash_key(key))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed scoped key, else None."""
    match = KEY_FORMAT.fullmatch(key)
    return match[1] if match else None


def matches(key: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_key(key), stored_hash)


def same_secret(given: str, expected: str) -> bool:
    """A constant-time comparison that also takes text `compare_digest` refuses (anything not ASCII)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def credential_from_header(name: str, value: str) -> str | None:
    """The credential a header carries: Bearer tokens, raw API keys, or proxy Basic auth's user."""
    value = value.strip()
    if name == "proxy-authorization":
        return proxy_auth_user(value)
    if name == "authorization":
        scheme, _, token = value.partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None
    return value or None


def proxy_auth_user(value: str) -> str | None:
    """`HTTPS_PROXY=http://KEY@host:port` arrives as `Basic base64("KEY:")`; KEY is the credential."""
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user or password or None


def credentials_in(headers: dict[str, str]) -> list[str]:
    """Every credential the request carries, from any header an SDK uses for one."""
    found = []
    for name in CREDENTIAL_HEADERS:
        value = headers.get(name)
        credential = credential_from_header(name, value) if value else None
        if credential:
            found.append(credential)
    return found


def query_params(query: str) -> list[tuple[str, str, str]]:
    """(raw pair, decoded name, decoded value) for each `name=value` of a query string, in order."""
    pairs = []
    for raw in query.split("&") if query else []:
        name, _, value = raw.partition("=")
        pairs.append((raw, unquote_plus(name), unquote_plus(value)))
    return pairs


def credentials_in_query(query: str) -> list[str]:
    return [value for _, name, value in query_params(query) if name in CREDENTIAL_QUERY_PARAMS and value]


def without_query_credentials(query: str) -> str:
    """The query with every credential parameter removed and the others exactly as sent."""
    return "&".join(raw for raw, name, _ in query_params(query) if name not in CREDENTIAL_QUERY_PARAMS)
