"""The audit log's chain: how a record line names the one before it, and how checkpoints are signed.

Every line is one JSON object that ends with its writer's chain fields:
`…,"writer":"3f9a0c1e","seq":42,"prev":"<sha256 of line 41>"}`. The hash is of the previous line's
exact bytes (without its newline), so changing any byte of a line breaks the link from the line
after it. Hashes are keyless, so someone who can write the file could recompute the whole chain;
what they cannot do is sign: every so often the writer appends a checkpoint whose last field is an
Ed25519 signature over the rest of its own line, which names (through `prev`) everything before it.

The signing key lives beside the proxy's CA, readable by its owner only; its public key is
exported beside it for whoever verifies.
"""

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64  # the `prev` of a writer's first record
SIGNING_KEY_NAME = "agentkeys-audit-signing-key.pem"
PUBLIC_KEY_NAME = "agentkeys-audit-signing-key.pub.pem"
SIGNATURE_FIELD = ',"sig":"'


def line_hash(line: bytes) -> str:
    """The hash the next record carries as `prev`: of the line's bytes, without its newline."""
    return hashlib.sha256(line).hexdigest()


def chain_fields(writer: str, seq: int, prev: str) -> str:
    """The end of every record line, closing its JSON object."""
    return f',"writer":"{writer}","seq":{seq},"prev":"{prev}"}}'


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """A short name for a signing key, written in each checkpoint: which key signed it."""
    return hashlib.sha256(raw_public_key(public_key)).hexdigest()[:16]


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """The key a start record names (base64 of its raw 32 bytes)."""
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text))


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key file as `audit public-key` exports it; ValueError if it is not an Ed25519 key."""
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class Signer:
    """The proxy's audit signing key."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    @property
    def public_key_text(self) -> str:
        return base64.b64encode(raw_public_key(self.public_key)).decode()

    def signed(self, unsigned_line: str) -> str:
        """The line with its signature as the last field; it signs every byte of the line without it."""
        signature = base64.b64encode(self.private_key.sign(unsigned_line.encode())).decode()
        return f'{unsigned_line[:-1]}{SIGNATURE_FIELD}{signature}"}}'


def split_signature(line: bytes) -> tuple[bytes, bytes] | None:
    """(the signed bytes, the signature) of a checkpoint line; None if it has no signature last."""
    at = line.rfind(SIGNATURE_FIELD.encode())
    if at < 0 or not line.endswith(b'"}'):
        return None
    try:
        signature = base64.b64decode(line[at + len(SIGNATURE_FIELD) : -2], validate=True)
    except ValueError:
        return None
    return line[:at] + b"}", signature


def signature_holds(public_key: Ed25519PublicKey, line: bytes) -> bool:
    parts = split_signature(line)
    if parts is None:
        return False
    try:
        public_key.verify(parts[1], parts[0])
    except InvalidSignature:
        return False
    return True


def signing_key(certs_dir: Path) -> Signer:
    """The audit signing key in `certs_dir`, made on first use (mode 0600) with its public key beside it.

    Several processes may start at once: the key is written to a temporary file and linked into
    place, so each either makes it or reads the one another made, never half of one.
    """
    path = certs_dir / SIGNING_KEY_NAME
    if not path.exists():
        certs_dir.mkdir(parents=True, exist_ok=True)
        _create_key(path)
    private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private_key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    signer = Signer(private_key)
    public_path = certs_dir / PUBLIC_KEY_NAME
    pem = public_key_pem(signer.public_key)
    if not public_path.exists() or public_path.read_bytes() != pem:
        public_path.write_bytes(pem)
    return signer


def _create_key(path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(descriptor, pem)
    finally:
        os.close(descriptor)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass  # another process made it first: use theirs
    finally:
        temporary.unlink()
