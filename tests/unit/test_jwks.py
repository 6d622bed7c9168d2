"""An issuer's key set: parsed from a JWKS (the algorithm from the key), cached, refreshed on an unknown
kid at most once per interval, from a URL on 127.0.0.1 or a file."""

import asyncio
import json

import pytest

from agentkeys.jwks import KeySet, KeysUnavailable, parse_jwks
from oidc_issuer import Issuer, JwksServer


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_key_carries_the_algorithm_its_jwk_names_or_its_type_implies():
    issuer = Issuer("https://issuer.example")
    rsa_kid, ec_kid = issuer.add_key("RS256"), issuer.add_key("ES384")
    document = issuer.jwks()
    del document["keys"][1]["alg"]  # an EC key without `alg`: its curve decides
    keys = parse_jwks(json.dumps(document))
    assert (keys[rsa_kid].algorithm, keys[ec_kid].algorithm) == ("RS256", "ES384")


def test_symmetric_encryption_and_broken_keys_are_never_used():
    issuer = Issuer("https://issuer.example")
    kid = issuer.add_key("ES256")
    document = issuer.jwks()
    document["keys"] += [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "shared-secret", "alg": "HS256"},
        {**document["keys"][0], "kid": "for-encryption", "use": "enc"},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        "not a key",
    ]
    assert list(parse_jwks(json.dumps(document))) == [kid]


@pytest.mark.parametrize("text", ["", "[]", '{"keys": {}}', "{not json", b"\xff\xfe"])
def test_a_document_that_is_not_a_jwks_is_refused(text):
    with pytest.raises(ValueError):
        parse_jwks(text)


def test_an_unknown_kid_refreshes_once_per_interval_however_many_tokens_ask():
    issuer = Issuer("https://issuer.example")
    known = issuer.add_key("RS256")
    clock = Clock()
    with JwksServer(issuer) as server:
        keys = KeySet(f"{server.url}/jwks", min_refresh_interval=60, clock=clock)

        async def flood():
            assert (await keys.key_for(known)).kid == known
            return await asyncio.gather(*(keys.key_for(f"made-up-{i}") for i in range(50)))

        assert asyncio.run(flood()) == [None] * 50
        assert server.fetches == 1, "the flood of unknown kids fetched the key set again"
        rotated = issuer.add_key("RS256")
        assert asyncio.run(keys.key_for(rotated)) is None  # too soon after the last fetch
        clock.now += 61
        assert asyncio.run(keys.key_for(rotated)).kid == rotated
        assert asyncio.run(keys.key_for("made-up-again")) is None
        assert server.fetches == 2


def test_keys_are_refetched_once_older_than_max_age_so_a_withdrawn_key_stops_working():
    issuer = Issuer("https://issuer.example")
    old = issuer.add_key("RS256")
    clock = Clock()
    with JwksServer(issuer) as server:
        keys = KeySet(f"{server.url}/jwks", min_refresh_interval=60, max_age=3600, clock=clock)
        assert asyncio.run(keys.key_for(old)) is not None
        issuer.published.remove(old)
        clock.now += 3601
        assert asyncio.run(keys.key_for(old)) is None
        assert server.fetches == 2


def test_a_key_set_that_cannot_be_fetched_is_unavailable_and_keeps_what_it_had():
    issuer = Issuer("https://issuer.example")
    kid = issuer.add_key("RS256")
    clock = Clock()
    with JwksServer(issuer) as server:
        url = f"{server.url}/jwks"
        keys = KeySet(url, min_refresh_interval=60, clock=clock)
        assert asyncio.run(keys.key_for(kid)) is not None
    clock.now += 61  # the server is gone: the refresh for a new kid fails, the key we had still verifies
    assert asyncio.run(keys.key_for("rotated")) is None
    assert "refused" in keys.last_error.lower()
    assert asyncio.run(keys.key_for(kid)) is not None
    with pytest.raises(KeysUnavailable, match="cannot get the issuer's keys"):  # no keys at all: not an unknown kid
        asyncio.run(KeySet(url).key_for(kid))


def test_a_file_is_read_at_start_and_again_when_a_new_kid_appears(tmp_path):
    issuer = Issuer("https://cluster.example")
    first = issuer.add_key("ES256")
    path = issuer.write_jwks(tmp_path / "jwks.json")
    clock = Clock()
    keys = KeySet(path, min_refresh_interval=60, clock=clock)
    keys.load_now()
    second = issuer.add_key("RS256")
    issuer.write_jwks(path)
    clock.now += 61
    assert asyncio.run(keys.key_for(first)).algorithm == "ES256"
    assert asyncio.run(keys.key_for(second)).algorithm == "RS256"


def test_a_lone_key_serves_a_token_that_names_none(tmp_path):
    issuer = Issuer("https://cluster.example")
    kid = issuer.add_key("ES256")
    keys = KeySet(issuer.write_jwks(tmp_path / "jwks.json"))
    keys.load_now()
    assert asyncio.run(keys.key_for(None)).kid == kid
    issuer.add_key("ES256")
    keys = KeySet(issuer.write_jwks(tmp_path / "jwks.json"))
    keys.load_now()
    assert asyncio.run(keys.key_for(None)) is None
