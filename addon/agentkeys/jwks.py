"""An OIDC issuer's signing keys (its JWKS), from its URL or a file, cached and refreshed when needed.

An issuer rotates its keys by publishing a new one before signing with it, so a token naming a key id
(`kid`) we do not know asks for a refresh. Refreshes are spaced at least `min_refresh_interval` apart
and one at a time, so a flood of tokens with made-up key ids costs the issuer one fetch, not one each;
a fetch is bounded by FETCH_TIMEOUT_SECONDS and MAX_JWKS_BYTES. Keys are also refreshed once older
than `max_age`, so a key the issuer withdrew stops working. A file (an offline cluster's keys) is
read the same way, so an updated file is picked up without a restart.

Each key carries the one algorithm it signs with, taken from the JWK (its `alg`, else its type and
curve), never from a token. Symmetric keys (`oct`) are never used: whoever can read the key set
could sign with them.
"""

import asyncio
import json
import logging
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import jwt

log = logging.getLogger(__name__)

FETCH_TIMEOUT_SECONDS = 5.0
MAX_JWKS_BYTES = 1024 * 1024
MIN_REFRESH_INTERVAL_SECONDS = 60.0
MAX_AGE_SECONDS = 3600.0
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES256K", "ES384", "ES512", "EdDSA"}
)


class KeysUnavailable(Exception):
    """The key set could not be fetched or read, and no earlier copy is at hand."""


@dataclass(frozen=True)
class SigningKey:
    kid: str | None
    algorithm: str  # the only algorithm a token signed with this key may name
    key: object  # a `cryptography` public key


def parse_jwks(text: str | bytes) -> dict[str | None, SigningKey]:
    """The usable signing keys of a JWKS document, by key id; ValueError if it is not a JWKS."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWKS: expected {"keys": [...]}')
    keys = {}
    for jwk in document["keys"]:
        key = signing_key(jwk)
        if key is not None:
            keys[key.kid] = key
    return keys


def signing_key(jwk) -> SigningKey | None:
    """One JWK as a verification key, or None for a key that is not for verifying signatures."""
    if not isinstance(jwk, dict) or jwk.get("kty") == "oct" or jwk.get("use", "sig") != "sig":
        return None
    try:
        parsed = jwt.PyJWK(jwk)
    except (jwt.PyJWTError, ValueError, TypeError) as e:
        log.warning("agentkeys: skipping a JWK the issuer published (kid %r): %s", jwk.get("kid"), e)
        return None
    if parsed.algorithm_name not in ASYMMETRIC_ALGORITHMS:
        return None
    kid = jwk.get("kid")
    return SigningKey(kid if isinstance(kid, str) else None, parsed.algorithm_name, parsed.key)


class KeySet:
    def __init__(
        self,
        source: str | Path,
        min_refresh_interval: float = MIN_REFRESH_INTERVAL_SECONDS,
        max_age: float = MAX_AGE_SECONDS,
        clock=time.monotonic,
    ):
        """`source`: an http(s) URL, or the Path of a file."""
        self.source = source
        self.min_refresh_interval = min_refresh_interval
        self.max_age = max_age
        self.clock = clock
        self._keys: dict[str | None, SigningKey] | None = None
        self._fetched_at: float | None = None  # of the keys we hold
        self._tried_at: float | None = None  # of the last fetch, whether or not it worked
        self._last_error: str | None = None
        self._refreshing = asyncio.Lock()

    def load_now(self) -> None:
        """Read the keys at once (a file at start-up, so a bad one stops the proxy); ValueError if unusable."""
        self._keys, self._fetched_at = parse_jwks(self._read()), self.clock()
        self._tried_at = self._fetched_at

    async def key_for(self, kid: str | None) -> SigningKey | None:
        """The key a token names (a lone key when it names none); None if the issuer has no such key,
        even after a refresh. KeysUnavailable if there are no keys at all to look in."""
        if self._due_for_refresh(kid):
            async with self._refreshing:
                if self._due_for_refresh(kid):  # unless another call refreshed while we waited
                    await self._refresh()
        if self._keys is None:
            raise KeysUnavailable(f"cannot get the issuer's keys from {self.source}: {self._last_error}")
        return self._find(kid)

    def _find(self, kid: str | None) -> SigningKey | None:
        if self._keys is None:
            return None
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if kid is not None else None

    def _due_for_refresh(self, kid: str | None) -> bool:
        if self._tried_at is None:
            return True
        if self.clock() - self._tried_at < self.min_refresh_interval:
            return False
        stale = self._fetched_at is None or self.clock() - self._fetched_at >= self.max_age
        return stale or self._find(kid) is None

    @property
    def last_error(self) -> str | None:
        return self._last_error

    async def _refresh(self) -> None:
        """Fetch the keys; on failure keep the ones we have (and remember why, for the refusal)."""
        self._tried_at = self.clock()
        try:
            text = await asyncio.wait_for(asyncio.to_thread(self._read), FETCH_TIMEOUT_SECONDS + 1)
            self._keys, self._fetched_at, self._last_error = parse_jwks(text), self.clock(), None
        except (OSError, ValueError, TimeoutError) as e:
            self._last_error = str(e) or type(e).__name__
            log.warning("agentkeys: cannot refresh the keys from %s: %s", self.source, self._last_error)

    def _read(self) -> bytes:
        """The key set's text, at most MAX_JWKS_BYTES of it (blocking: run on a worker thread)."""
        if isinstance(self.source, Path):
            with open(self.source, "rb") as file:
                text = file.read(MAX_JWKS_BYTES + 1)
        else:
            request = urllib.request.Request(self.source, headers={"accept": "application/json"})
            with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_SECONDS) as response:
                text = response.read(MAX_JWKS_BYTES + 1)
        if len(text) > MAX_JWKS_BYTES:
            raise ValueError(f"the key set is larger than {MAX_JWKS_BYTES} bytes")
        return text
