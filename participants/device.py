"""A participant's device: where its private data, signing key and adapters live.

On a real device the SuperNode is started with `--node-config "device-dir='/path'"`. In a
simulation every virtual participant gets `$BOUQUET_DEVICES_ROOT/<partition-id>/`, prepared by
`bouquet simulate`. Layout:
    history.jsonl   the personal records it trains on or assembles with
    buffer.json     its stream buffer, when records arrive one at a time (`bouquet device add`;
                    participants.stream_buffer): then what it trains on and assembles with is the buffer's
                    annotated items and the pairs its model wrote like them, and history.jsonl is not read
    test.jsonl      held-out records for evaluation (optional)
    key.pem         its Ed25519 signing key (created on first use)
    adapter/        its assembled adapter, a PEFT LoRA folder
    supernode.key   its SuperNode key (EC P-384, OpenSSH), and supernode.pub, the key the operator registers
    limits.json     what a coordinator may ask of it (participants.limits; defaults when absent)
    policy.json     what it lets leave it: share ratio, profile privacy, metrics, randomness
                    (participants.privacy_policy; the safe defaults when absent)
    privacy-ledger.json  the ε it has spent, release by release (participants.privacy_ledger)
    flwr-home/      the SuperNode's own FLWR_HOME
`bouquet device init` (participants.device_setup) creates a real device's folder, 0700, its keys 0600.
A device that may run on a catalog seed also knows a local copy of the catalog (`--node-config
"catalog-dir='/path'"`, or $BOUQUET_CATALOG_DIR in a simulation): the coordinator names a seed by its catalog
name and content hash, and the device loads it from there and checks the hash.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from participants.limits import LIMITS_FILE, UNBOUNDED, DeviceLimits
from participants.privacy_ledger import LEDGER_FILE, PrivacyLedger
from participants.privacy_policy import POLICY_FILE, PrivacyPolicy
from participants.stream_buffer import load_buffer
from protocols.catalog import SEEDS_DIR
from protocols.identity import load_or_create_key
from protocols.records import PersonalRecord, load_records

DEVICES_ROOT_ENV = "BOUQUET_DEVICES_ROOT"
CATALOG_DIR_ENV = "BOUQUET_CATALOG_DIR"


@dataclass(frozen=True)
class Device:
    root: Path
    catalog_dir: Path | None = None
    simulated: bool = False  # a virtual participant of a simulation: the harness is its owner, no limits

    @classmethod
    def from_node_config(cls, node_config: dict) -> "Device":
        catalog = node_config.get("catalog-dir") or os.environ.get(CATALOG_DIR_ENV)
        catalog_dir = Path(str(catalog)) if catalog else None
        if "device-dir" in node_config:
            return cls(Path(str(node_config["device-dir"])), catalog_dir)
        root = os.environ.get(DEVICES_ROOT_ENV)
        if root is not None and "partition-id" in node_config:
            return cls(Path(root) / str(node_config["partition-id"]), catalog_dir, simulated=True)
        raise RuntimeError("this node has no device folder: start the SuperNode with "
                           "--node-config \"device-dir='/path/to/device'\" (a folder holding history.jsonl)")

    def history(self, with_synthetic: bool = True) -> list[PersonalRecord]:
        """The records it trains on: its buffer's annotated items and kept pairs when it has a buffer, else
        history.jsonl. `with_synthetic=False` leaves the written pairs out (what a DP release may count: a pair
        derives from an owner's record, so with it that record would count more than once)."""
        buffer = load_buffer(self.root)
        if buffer is None:
            if not (self.root / "history.jsonl").exists():
                raise FileNotFoundError(f"{self.root} holds neither history.jsonl nor a stream buffer: give it "
                                        f"records (`bouquet device init --data FILE` or `bouquet device add`)")
            return load_records(self.root / "history.jsonl")
        records = buffer.training_records(with_synthetic)
        if not records:
            raise RuntimeError(f"{self.root}'s buffer holds no annotated item yet: annotate some first "
                               f"(`bouquet device annotate {self.root} --ask`)")
        return records

    def test(self) -> list[PersonalRecord]:
        path = self.root / "test.jsonl"
        return load_records(path) if path.exists() else []

    def key(self):
        return load_or_create_key(self.signing_key_path)

    @property
    def signing_key_path(self) -> Path:
        return self.root / "key.pem"

    @property
    def supernode_key_path(self) -> Path:
        return self.root / "supernode.key"

    @property
    def supernode_pub_path(self) -> Path:
        return self.root / "supernode.pub"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    def limits(self) -> DeviceLimits:
        """The device's limits.json; without one, the safe defaults (a simulated device: none)."""
        path = self.root / LIMITS_FILE
        return UNBOUNDED if self.simulated and not path.exists() else DeviceLimits.load(path)

    def policy(self) -> PrivacyPolicy:
        """The device's policy.json; without one, the safe defaults, for a simulated device too."""
        return PrivacyPolicy.load(self.root / POLICY_FILE)

    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.root / LEDGER_FILE)

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    def catalog_seed_folder(self, name: str) -> Path:
        """Where this device keeps the catalog seed `name`; a clear error when it keeps no catalog."""
        if self.catalog_dir is None:
            raise RuntimeError(f"the coordinator asks for catalog seed {name!r}, but this device keeps no catalog: "
                               f"start it with --node-config \"catalog-dir='/path/to/catalog'\"")
        return self.catalog_dir / SEEDS_DIR / name
