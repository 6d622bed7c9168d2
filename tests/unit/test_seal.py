"""seal.py: key records sealed under the proxies' secret; any change to what a record grants breaks it."""

import dataclasses
import os

import pytest

from agentkeys.ledger import KeyRecord
from agentkeys.seal import SEALED_FIELDS, SECRET_ENV, RecordSeal, store_seal

RECORD = KeyRecord(
    key_id="k1", key_hash="ab" * 32, name="agent", policy_name="p", policy_json='{"models": ["gpt-4o-mini"]}',
    created_at=1_000_000.5, expires_at=1_003_600.5, budget_micros=800, parent_id="root", depth=1,
    identity_json='{"repository": "acme/evals"}', account_id="acme",
)  # fmt: skip
CHANGED = {
    "key_id": "k2", "key_hash": "cd" * 32, "name": "other", "policy_name": "q", "policy_json": '{"models": ["*"]}',
    "created_at": 999_999.5, "expires_at": 1_103_600.5, "budget_micros": 1_204, "parent_id": None, "depth": 0,
    "identity_json": None, "account_id": "other-tenant",
}  # fmt: skip


def test_a_sealed_record_is_intact_and_its_mutable_fields_are_not_sealed():
    sealed = RecordSeal(b"secret").sealed(RECORD)
    assert RecordSeal(b"secret").intact(sealed)
    moved = dataclasses.replace(sealed, spent_micros=500, held_micros=100, revoked_at=1.0, grant_micros=0)
    assert RecordSeal(b"secret").intact(moved), "spend, holds and revocation change with every call"


@pytest.mark.parametrize("field", SEALED_FIELDS)
def test_any_change_to_what_a_record_grants_breaks_its_seal(field):
    sealed = RecordSeal(b"secret").sealed(RECORD)
    assert not RecordSeal(b"secret").intact(dataclasses.replace(sealed, **{field: CHANGED[field]}))


def test_an_unsealed_record_or_another_secret_is_not_trusted():
    assert not RecordSeal(b"secret").intact(RECORD)
    assert not RecordSeal(b"other").intact(RecordSeal(b"secret").sealed(RECORD))


def test_the_secret_comes_from_the_environment_else_a_private_file_made_once(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    first = store_seal(tmp_path / "certs").sealed(RECORD)
    assert oct(os.stat(tmp_path / "certs" / "store.secret").st_mode & 0o777) == "0o600"
    assert store_seal(tmp_path / "certs").intact(first), "the same file on every start"
    monkeypatch.setenv(SECRET_ENV, "the fleet's secret")
    assert not store_seal(tmp_path / "certs").intact(first)
    assert store_seal(tmp_path / "elsewhere").intact(RecordSeal(b"the fleet's secret").sealed(RECORD))
