"""A simulated federation: virtual participants' devices on disk, and the Flower Simulation Engine.

Each user of a data set becomes one virtual SuperNode whose device folder
(run_dir/devices/<partition-id>/) holds its history and held-out records; the ClientApps find
it through BOUQUET_DEVICES_ROOT (and a catalog, if any, through BOUQUET_CATALOG_DIR). A virtual device's
signing key derives from the run's rng-seed and its user, so that the same command picks the same sharers
and newcomers (the coordinator orders nodes by key id); a real device makes its key from the OS's randomness. One machine runs a local Ray instance; to spread the virtual
nodes over several machines start a Ray cluster (`ray start --head`, then
`ray start --address=HEAD:6379` on the others) and pass its address.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.server_app import make_server_app
from participants.client_app import app as client_app
from participants.device import CATALOG_DIR_ENV, DEVICES_ROOT_ENV
from simulation.datasets import write_user_files
from simulation.user_data import UserData
from simulation.settings import SimulateSettings

log = logging.getLogger("bouquet")


def pinned_key(rng_seed: int, user: str) -> bytes:
    """A virtual device's signing key (PEM), pinned to the run's rng-seed and its user."""
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"device:{rng_seed}:{user}".encode()).digest())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def prepare_devices(users: list[UserData], run_dir: Path, rng_seed: int) -> dict[int, str]:
    """Write each user's files and pinned key into its device folder; return partition-id -> user."""
    root = run_dir / "devices"
    mapping = {}
    for pid, user in enumerate(users):
        write_user_files(user, root / str(pid))
        key = root / str(pid) / "key.pem"
        key.write_bytes(pinned_key(rng_seed, user.user))
        key.chmod(0o600)
        mapping[pid] = user.user
    (run_dir / "devices.json").write_text(json.dumps(mapping, indent=1))
    return mapping


def run_federation(users: list[UserData], settings: SimulateSettings) -> dict:
    """Run one bouquet round over virtual participants; return the metrics the coordinator wrote."""
    run_dir = Path(settings.out_dir)
    mapping = prepare_devices(users, run_dir, settings.rng_seed)
    return simulate_devices(run_dir, mapping, settings)


def simulate_devices(run_dir: Path, mapping: dict[int, str], settings: SimulateSettings) -> dict:
    """Run the Flower simulation over devices already laid out under run_dir/devices/."""
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
    run_simulation(server_app=make_server_app(settings), client_app=client_app, num_supernodes=len(mapping),
                   backend_config=backend)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise RuntimeError(f"the simulation ended without writing {metrics_path}; see the log above")
    collect_adapters(run_dir, mapping)
    return json.loads(metrics_path.read_text())


def collect_adapters(run_dir: Path, mapping: dict[int, str]) -> None:
    """Copy each newcomer's adapter from its device folder to run_dir/adapters/<user>/."""
    for pid, user in mapping.items():
        src = run_dir / "devices" / str(pid) / "adapter"
        if src.is_dir():
            dst = run_dir / "adapters" / user
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
