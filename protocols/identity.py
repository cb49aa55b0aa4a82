"""Contributor identities: Ed25519 keys, and the short key id that pieces carry.

A weak public key (a point of small order, or a non-canonical encoding) is refused before any signature is
checked: with the identity point as key, the signature R = identity, S = 0 verifies every message, so anyone could
sign pieces under that key's contributor id.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


P = 2**255 - 19
# y coordinates of the points of order 1, 2, 4 and 8 (the identity, -1, the two of y = 0, and the four order-8
# points, two y values): every encoding whose y reduces to one of these is a small-order point
_Y8 = 0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826
SMALL_ORDER_Y = frozenset({0, 1, P - 1, _Y8, P - _Y8})


def weak_key_reason(public_key: bytes) -> str | None:
    """Why an Ed25519 public key cannot be trusted (wrong length, non-canonical, small order), or None."""
    if len(public_key) != 32:
        return f"the key is {len(public_key)} bytes, an Ed25519 key is 32"
    y = int.from_bytes(public_key, "little") & ((1 << 255) - 1)
    if y >= P:
        return "the key is a non-canonical encoding (y >= 2^255 - 19)"
    if y in SMALL_ORDER_Y:
        return "the key is a small-order point, under which forged signatures verify"
    return None


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: bytes) -> str:
    """A contributor's id: the first 16 hex digits of sha256 of its raw public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def load_or_create_key(path: str | Path) -> Ed25519PrivateKey:
    """The device's signing key; created (mode 0600) on first use and kept."""
    path = Path(path)
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    tmp.replace(path)
    return key


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True only for a strong key and a signature that verifies under it."""
    if weak_key_reason(public_key) is not None:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False
