"""A simulated federation: virtual participants' devices on disk, and the Flower Simulation Engine.

Each user of a data set becomes one virtual SuperNode whose device folder
(run_dir/devices/<partition-id>/) holds its history and held-out records; the ClientApps find
it through BOUQUET_DEVICES_ROOT (and a catalog, if any, through BOUQUET_CATALOG_DIR). A virtual device's
signing key derives from the run's rng-seed and its user, so that the same command picks the same sharers
and newcomers (the coordinator orders nodes by key id); a real device makes its key from the OS's randomness. One machine runs a local Ray instance; to spread the virtual
nodes over several machines start a Ray cluster (`ray start --head`, then
`ray start --address=HEAD:6379` on the others) and pass its address.

The coordinator knows nodes by node id and signing key id only (its metrics.json names no user). The harness
knows more: each virtual device's user (devices.json) and key (its key.pem), so it joins the coordinator's report
with its own list of devices, by key id, into run_dir/summary.json, the view `bouquet simulate` prints. Node ids
change from run to run; key ids do not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.serverapp import ServerApp

from coordinator.server_app import make_server_app
from participants.client_app import app as client_app
from participants.device import CATALOG_DIR_ENV, DEVICES_ROOT_ENV
from participants.privacy_ledger import LEDGER_FILE
from participants.privacy_policy import POLICY_FILE, PrivacyPolicy
from protocols.identity import key_id, load_or_create_key, public_bytes
from simulation.datasets import write_user_files
from simulation.user_data import UserData, folder_name
from simulation.settings import SimulateSettings

log = logging.getLogger("bouquet")


def pinned_key(rng_seed: int, user: str) -> bytes:
    """A virtual device's signing key (PEM), pinned to the run's rng-seed and its user."""
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"device:{rng_seed}:{user}".encode()).digest())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pinned_policy(rng_seed: int, user: str, base: PrivacyPolicy | None = None) -> PrivacyPolicy:
    """A virtual device's privacy policy: `base` (default: the defaults), with its randomness pinned to the run's
    rng-seed and its user unless `base` pins it, so that the same command draws the same profile noise, shares and
    DP-SGD noise (a real device's policy pins nothing: its randomness is the OS's)."""
    base = base or PrivacyPolicy()
    if base.pinned_seed is not None:
        return base
    seed = int.from_bytes(hashlib.sha256(f"policy:{rng_seed}:{user}".encode()).digest()[:8], "little")
    return replace(base, pinned_seed=seed)


def prepare_devices(users: list[UserData], run_dir: Path, rng_seed: int,
                    policy: PrivacyPolicy | None = None) -> dict[int, str]:
    """Write each user's files, pinned key and pinned policy into its device folder (a fresh virtual device: no
    ε spent yet); return partition-id -> user. Without `policy`, the defaults with min-share-records lowered to the
    shortest history (SimulateSettings.device_policy says why)."""
    if policy is None:
        shortest = min(len(u.history) for u in users)
        policy = PrivacyPolicy(min_share_records=min(shortest, PrivacyPolicy.min_share_records))
    root = run_dir / "devices"
    mapping = {}
    for pid, user in enumerate(users):
        write_user_files(user, root / str(pid))
        key = root / str(pid) / "key.pem"
        key.write_bytes(pinned_key(rng_seed, user.user))
        key.chmod(0o600)
        (root / str(pid) / POLICY_FILE).write_text(pinned_policy(rng_seed, user.user, policy).to_json())
        (root / str(pid) / LEDGER_FILE).unlink(missing_ok=True)
        mapping[pid] = user.user
    (run_dir / "devices.json").write_text(json.dumps(mapping, indent=1))
    return mapping


def run_federation(users: list[UserData], settings: SimulateSettings) -> dict:
    """Run one bouquet round over virtual participants; return its summary (`summarize`)."""
    run_dir = Path(settings.out_dir)
    mapping = prepare_devices(users, run_dir, settings.rng_seed, settings.device_policy())
    return simulate_devices(run_dir, mapping, settings)


def simulate_devices(run_dir: Path, mapping: dict[int, str], settings: SimulateSettings,
                     server_app: ServerApp | None = None) -> dict:
    """Run the Flower simulation over devices already laid out under run_dir/devices/; write and return the run's
    summary (`summarize`). `server_app` replaces the coordinator's (the privacy audit wraps its Grid)."""
    from flwr.simulation import run_simulation

    # Ray workers inherit the driver's environment on this machine; on a cluster, start the other
    # machines' `ray start` with BOUQUET_DEVICES_ROOT (and BOUQUET_CATALOG_DIR) set to shared folders.
    os.environ[DEVICES_ROOT_ENV] = str((run_dir / "devices").resolve())
    if settings.catalog:
        os.environ[CATALOG_DIR_ENV] = str(Path(settings.catalog).resolve())
    init_args: dict = {"include_dashboard": False}
    if settings.ray_address:
        init_args["address"] = settings.ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": settings.cpus_per_client, "num_gpus": settings.gpus_per_client},
               "init_args": init_args}
    run_simulation(server_app=server_app or make_server_app(settings), client_app=client_app,
                   num_supernodes=len(mapping), backend_config=backend)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise RuntimeError(f"the simulation ended without writing {metrics_path}; see the log above")
    collect_adapters(run_dir, mapping)
    summary = summarize(json.loads(metrics_path.read_text()), device_key_ids(run_dir, mapping))
    write_summary(run_dir, summary)
    return summary


def device_key_ids(run_dir: Path, mapping: dict[int, str]) -> dict[str, str]:
    """Signing key id -> user, from each virtual device's key.pem: the link between the coordinator's report and
    the harness's devices, which no message carries."""
    return {key_id(public_bytes(load_or_create_key(run_dir / "devices" / str(pid) / "key.pem").public_key())): user
            for pid, user in mapping.items() if (run_dir / "devices" / str(pid) / "key.pem").is_file()}


def summarize(metrics: dict, users_by_key: dict[str, str]) -> dict:
    """The coordinator's report with each node it names by key id joined to its virtual device's user:
    sharers and seed choices keyed by user, and a "user" in each newcomer's row ("node <id>" for a node that never
    reported a key id); "nodes" maps each node id to its user. Everything else is the report as it is."""
    nodes = {}

    def user_of(node, row: dict) -> str:
        user = users_by_key.get(row.get("key-id", ""), f"node {node}")
        nodes[str(node)] = user
        return user

    joined = {user_of(node, row): {"node": int(node)} | row for node, row in metrics.get("sharers", {}).items()}
    chosen = {user_of(node, row): {"node": int(node)} | row for node, row in metrics.get("selections", {}).items()}
    newcomers = [{"user": user_of(row["node"], row)} | row for row in metrics.get("newcomers", [])]
    return metrics | {"sharers": joined, "selections": chosen, "newcomers": newcomers, "nodes": nodes}


def write_summary(run_dir: Path, summary: dict) -> None:
    """run_dir/summary.json: the harness's view of the run, names included, beside the coordinator's metrics.json."""
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def collect_adapters(run_dir: Path, mapping: dict[int, str]) -> None:
    """Copy each newcomer's adapter from its device folder to run_dir/adapters/<user>/."""
    for pid, user in mapping.items():
        src = run_dir / "devices" / str(pid) / "adapter"
        if src.is_dir():
            dst = run_dir / "adapters" / folder_name(user)
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
