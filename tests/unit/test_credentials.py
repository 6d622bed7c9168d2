"""Scoped keys (credentials.py): minting, the id a key names, matching its stored hash, and finding
one wherever a request carries it (headers, the proxy user, the query)."""

import base64
import hashlib

import pytest

from agentkeys import credentials


def test_query_credentials_are_stripped_and_the_rest_kept_as_sent():
    query = "alt=sse&key=ak_x_y&k%65y=second&keys=1&x=a%20b"
    assert credentials.credentials_in_query(query) == ["ak_x_y", "second"]
    assert credentials.without_query_credentials(query) == "alt=sse&keys=1&x=a%20b"


# ----- minting and recognising a key -----


def test_a_minted_key_names_its_id_and_only_its_hash_is_kept():
    minted = credentials.mint()
    assert minted.key.startswith(f"ak_{minted.key_id}_")
    assert credentials.key_id_of(minted.key) == minted.key_id
    assert minted.key_hash == hashlib.sha256(minted.key.encode()).hexdigest()
    assert minted.key not in minted.key_hash


def test_every_minted_key_is_new():
    keys = [credentials.mint() for _ in range(50)]
    assert len({k.key for k in keys}) == len({k.key_id for k in keys}) == 50


def test_a_key_matches_its_own_hash_only():
    one, other = credentials.mint(), credentials.mint()
    assert credentials.matches(one.key, one.key_hash)
    assert not credentials.matches(other.key, one.key_hash)
    assert not credentials.matches(one.key + "x", one.key_hash)


@pytest.mark.parametrize(
    ("text", "key_id"),
    [
        ("ak_3f9c01_secret", "3f9c01"),
        ("ak_3f9c01_secret_with_underscores", "3f9c01"),
        ("sk-3f9c01_secret", None),
        ("ak_3f9c01", None),
        ("ak_3f9c01_", None),
        ("ak__secret", None),
        ("AK_3f9c01_secret", None),
        ("", None),
    ],
)
def test_key_id_of_reads_only_well_formed_keys(text, key_id):
    assert credentials.key_id_of(text) == key_id


# ----- where a request carries a credential -----


def basic(userinfo: str) -> str:
    return "Basic " + base64.b64encode(userinfo.encode()).decode()


@pytest.mark.parametrize(
    ("name", "value", "credential"),
    [
        ("authorization", "Bearer ak_1_s", "ak_1_s"),
        ("authorization", "bearer   ak_1_s  ", "ak_1_s"),
        ("authorization", "Bearer ", None),
        ("authorization", "Basic YWtfMV9zOg==", None),
        ("x-api-key", " ak_1_s ", "ak_1_s"),
        ("api-key", "ak_1_s", "ak_1_s"),
        ("x-goog-api-key", "ak_1_s", "ak_1_s"),
        ("x-api-key", "  ", None),
        ("proxy-authorization", basic("ak_1_s:"), "ak_1_s"),
        ("proxy-authorization", basic(":ak_1_s"), "ak_1_s"),
        ("proxy-authorization", basic("ak_1_s:ignored"), "ak_1_s"),
        ("proxy-authorization", "Bearer ak_1_s", None),
        ("proxy-authorization", "Basic %%%", None),
        ("proxy-authorization", "Basic " + base64.b64encode(b"\xff\xfe:").decode(), None),
    ],
)
def test_credential_from_header(name, value, credential):
    assert credentials.credential_from_header(name, value) == credential


def test_the_https_proxy_user_is_the_key():
    """`HTTPS_PROXY=http://ak_…@host:port`: the client sends the user with an empty password."""
    assert credentials.proxy_auth_user(basic("ak_1_s:")) == "ak_1_s"
    assert credentials.proxy_auth_user(basic(":")) is None
    assert credentials.proxy_auth_user("Digest abc") is None


def test_credentials_in_headers_are_found_wherever_an_sdk_puts_them():
    headers = {
        "authorization": "Bearer ak_1_a",
        "x-api-key": "ak_1_b",
        "api-key": "ak_1_c",
        "x-goog-api-key": "ak_1_d",
        "proxy-authorization": basic("ak_1_e:"),
        "x-other": "ak_1_f",
    }
    assert credentials.credentials_in(headers) == ["ak_1_a", "ak_1_b", "ak_1_c", "ak_1_d", "ak_1_e"]
    assert credentials.credentials_in({"x-api-key": ""}) == []


@pytest.mark.parametrize(
    ("query", "found"),
    [
        ("", []),
        ("key=ak_1_s", ["ak_1_s"]),
        ("alt=sse&key=ak%5F1%5Fs", ["ak_1_s"]),
        ("key=&alt=sse", []),
        ("apikey=ak_1_s&keys=x", []),
    ],
)
def test_credentials_in_the_query(query, found):
    assert credentials.credentials_in_query(query) == found
