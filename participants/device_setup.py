"""Setting up a real device: its folder, its data, its two keys, its limits, and the SuperNode it runs.

    init_device          the folder (0700): history.jsonl (and test.jsonl) checked with load_records, the
                         piece-signing key (Ed25519), the SuperNode key (EC P-384 in OpenSSH format, the only
                         kind flower-supernode accepts), limits.json and policy.json (participants.privacy_policy)
                         with the defaults; every file written to a temp file and renamed, owner-readable only. Keys that exist are kept: a device's identity
                         is its keys, so running init again replaces the data, never the keys.
    supernode_command    the flower-supernode command line for this device
    withdrawal_request   a signed request to withdraw all this device's pieces from a pool (protocols.withdrawal)
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from participants.device import Device
from participants.limits import LIMITS_FILE, DeviceLimits
from participants.privacy_policy import POLICY_FILE, PrivacyPolicy
from protocols.files import write_atomic
from protocols.identity import key_id, public_bytes
from protocols.records import load_records
from protocols.withdrawal import make_withdrawal


@dataclass(frozen=True)
class DeviceSetup:
    device: Device
    supernode_public_key: str  # the OpenSSH line the operator registers (`bouquet coordinator add-device`)
    contributor: str  # the key id its pieces carry
    history: int
    test: int


def supernode_key(device: Device) -> ec.EllipticCurvePrivateKey:
    """The device's SuperNode key, created (EC P-384, OpenSSH private format, 0600) when missing."""
    path = device.supernode_key_path
    if path.exists():
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path}: not an EC key; flower-supernode needs an EC key on a NIST curve")
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        write_atomic(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_atomic(device.supernode_pub_path, pub + b"\n", 0o644)
    return key


def _records_file(source: str | Path, target: Path) -> int:
    records = load_records(source)  # refuses a malformed file as a whole, naming the line
    write_atomic(target, "".join(r.to_json() + "\n" for r in records).encode("utf-8"))
    return len(records)


def init_device(root: str | Path, data: str | Path | None, test: str | Path | None = None) -> DeviceSetup:
    """`data`: its history, or None for a device that learns from its stream (`bouquet device add`)."""
    device = Device(Path(root).expanduser().resolve())
    device.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(device.root, 0o700)
    n_history = _records_file(data, device.root / "history.jsonl") if data else 0
    n_test = _records_file(test, device.root / "test.jsonl") if test else 0
    signing = device.key()  # created 0600 and atomically on first use (protocols.identity)
    os.chmod(device.signing_key_path, 0o600)
    node_key = supernode_key(device)
    limits = device.root / LIMITS_FILE
    if not limits.exists():
        write_atomic(limits, DeviceLimits().to_json().encode())
    else:
        DeviceLimits.load(limits)  # an edited file must still read
    policy = device.root / POLICY_FILE
    if not policy.exists():
        write_atomic(policy, PrivacyPolicy().to_json().encode())
    else:
        PrivacyPolicy.load(policy)  # an edited policy must still read: the owner's choices are kept
    device.flwr_home.mkdir(mode=0o700, exist_ok=True)
    pub = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return DeviceSetup(device, pub.decode(), key_id(public_bytes(signing.public_key())), n_history, n_test)


def supernode_command(device: Device, coordinator: str, ca: str | Path, port: int = 9094,
                      catalog: str | Path | None = None) -> list[str]:
    """flower-supernode for this device: TLS to `coordinator` (HOST:PORT, verified with the CA file), its own
    key, its folder as node config; `port` is its local ClientApp API (two devices on one host need two)."""
    if not device.supernode_key_path.exists():
        raise FileNotFoundError(f"{device.root} has no SuperNode key; run `bouquet device init {device.root} "
                                f"--data FILE` first")
    for path, what in ((device.root, "device folder"), (Path(ca), "CA file")) + (
            ((Path(catalog), "catalog folder"),) if catalog else ()):
        if "'" in str(path):
            raise ValueError(f"the {what} path {path} contains a single quote, which --node-config cannot carry")
    config = f"device-dir='{device.root}'" + (f" catalog-dir='{Path(catalog).resolve()}'" if catalog else "")
    exe = shutil.which("flower-supernode", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        raise FileNotFoundError(f"flower-supernode is not installed beside {sys.executable}")
    return [exe, "--superlink", coordinator, "--root-certificates", str(Path(ca).resolve()),
            "--auth-supernode-private-key", str(device.supernode_key_path), "--node-config", config,
            "--port", str(port)]


def supernode_env(device: Device) -> dict[str, str]:
    """The SuperNode's environment: this interpreter's bin/ first on PATH (it starts flower-superexec by name), the
    device's own FLWR_HOME, no runtime installs, no update checks, no telemetry."""
    env = dict(os.environ) | {"FLWR_HOME": str(device.flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                              "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def withdrawal_request(root: str | Path) -> str:
    """The JSON of a request, signed with this device's piece-signing key, to withdraw all its pieces."""
    device = Device(Path(root).expanduser().resolve())
    if not device.signing_key_path.exists():
        raise FileNotFoundError(f"{device.root} has no signing key ({device.signing_key_path.name}): it never "
                                f"shared a piece")
    return make_withdrawal(device.key()).to_json()
