"""A contributor's request to withdraw its pieces from a pool, signed with its piece-signing key.

    {"kind": "bouquet.withdrawal", "version": 1, "contributor": "<key id>", "public-key": "<hex, 32 bytes>",
     "time": "<ISO 8601, UTC>", "nonce": "<hex, 16 bytes>", "signature": "<hex, 64 bytes>"}

The signature is Ed25519 over DOMAIN + the canonical JSON of every other field (sorted keys, no spaces). The
domain prefix keeps a piece's signature (made with the same key over a piece digest) from ever reading as a
withdrawal. `contributor` must be the key id of `public-key` (protocols.identity.key_id), which is what every
piece of that contributor carries. The request id is the sha256 of the signed bytes: a pool applies a request
once, so replaying an old request never removes pieces shared after it. `time` is for people (the operator's
log); nothing depends on the clocks agreeing.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from protocols.identity import key_id, public_bytes, verify, weak_key_reason

KIND = "bouquet.withdrawal"
VERSION = 1
DOMAIN = b"bouquet withdrawal v1\n"
MAX_BYTES = 4096
FIELDS = ("kind", "version", "contributor", "public-key", "time", "nonce")


class WithdrawalError(ValueError):
    """A withdrawal request that is malformed or whose signature does not verify."""


@dataclass(frozen=True)
class Withdrawal:
    contributor: str
    public_key: bytes
    time: str
    nonce: str
    signature: bytes

    def body(self) -> dict:
        return {"kind": KIND, "version": VERSION, "contributor": self.contributor,
                "public-key": self.public_key.hex(), "time": self.time, "nonce": self.nonce}

    def signed_bytes(self) -> bytes:
        return DOMAIN + json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def request_id(self) -> str:
        return hashlib.sha256(self.signed_bytes()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(self.body() | {"signature": self.signature.hex()}, indent=1)


def make_withdrawal(private_key, when: datetime | None = None) -> Withdrawal:
    """A request, signed by `private_key` (the device's Ed25519 piece-signing key), to withdraw all its pieces."""
    pub = public_bytes(private_key.public_key())
    stamp = (when or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    unsigned = Withdrawal(key_id(pub), pub, stamp, secrets.token_hex(16), b"")
    return Withdrawal(unsigned.contributor, pub, stamp, unsigned.nonce, private_key.sign(unsigned.signed_bytes()))


def parse_withdrawal(text: str | bytes) -> Withdrawal:
    """A request read and checked: its fields, its key (not weak), its key id, its signature."""
    if len(text) > MAX_BYTES:
        raise WithdrawalError(f"a withdrawal request is at most {MAX_BYTES} bytes, this one is {len(text)}")
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise WithdrawalError(f"not a JSON withdrawal request: {err}") from None
    if not isinstance(obj, dict):
        raise WithdrawalError("a withdrawal request is a JSON object")
    unknown = sorted(set(obj) - set(FIELDS) - {"signature"})
    missing = [f for f in (*FIELDS, "signature") if f not in obj]
    if unknown or missing:
        raise WithdrawalError(f"bad fields: missing {missing}, unknown {unknown}")
    if obj["kind"] != KIND or obj["version"] != VERSION:
        raise WithdrawalError(f"not a {KIND} version {VERSION} request: kind {obj['kind']!r}, "
                              f"version {obj['version']!r}")
    if not all(isinstance(obj[f], str) for f in ("contributor", "public-key", "time", "nonce", "signature")):
        raise WithdrawalError("contributor, public-key, time, nonce and signature must be strings")
    try:
        pub, sig = bytes.fromhex(obj["public-key"]), bytes.fromhex(obj["signature"])
    except ValueError:
        raise WithdrawalError("public-key and signature must be hex") from None
    weak = weak_key_reason(pub)
    if weak:
        raise WithdrawalError(f"refused: {weak}")
    if key_id(pub) != obj["contributor"]:
        raise WithdrawalError(f"contributor {obj['contributor']!r} is not the key id of the request's key "
                              f"({key_id(pub)})")
    request = Withdrawal(obj["contributor"], pub, obj["time"], obj["nonce"], sig)
    if not verify(pub, sig, request.signed_bytes()):
        raise WithdrawalError(f"the signature does not verify under contributor {request.contributor}'s key")
    return request
