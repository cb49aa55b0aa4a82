"""A simulated federation: virtual participants' devices on disk, and the Flower Simulation Engine.

Each user of a data set becomes one virtual SuperNode whose device folder
(run_dir/devices/<partition-id>/) holds its history and held-out records; the ClientApps find
it through BOUQUET_DEVICES_ROOT. One machine runs a local Ray instance; to spread the virtual
nodes over several machines start a Ray cluster (`ray start --head`, then
`ray start --address=HEAD:6379` on the others) and pass its address.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from coordinator.config import RunSettings
from coordinator.server_app import make_server_app
from participants.client_app import app as client_app
from participants.device import DEVICES_ROOT_ENV
from simulation.datasets import UserData, write_user_files

log = logging.getLogger("bouquet")


def prepare_devices(users: list[UserData], run_dir: Path) -> dict[int, str]:
    """Write each user's files into its device folder; return partition-id -> user."""
    root = run_dir / "devices"
    mapping = {}
    for pid, user in enumerate(users):
        write_user_files(user, root / str(pid))
        mapping[pid] = user.user
    (run_dir / "devices.json").write_text(json.dumps(mapping, indent=1))
    return mapping


def run_federation(users: list[UserData], settings: RunSettings, *, cpus_per_client: float = 1.0,
                   ray_address: str | None = None, gpus_per_client: float = 0.0) -> dict:
    """Run one bouquet round over virtual participants; return the metrics the coordinator wrote."""
    run_dir = Path(settings.out_dir)
    mapping = prepare_devices(users, run_dir)
    return simulate_devices(run_dir, mapping, settings, cpus_per_client=cpus_per_client, ray_address=ray_address,
                            gpus_per_client=gpus_per_client)


def simulate_devices(run_dir: Path, mapping: dict[int, str], settings: RunSettings, *, cpus_per_client: float = 1.0,
                     ray_address: str | None = None, gpus_per_client: float = 0.0) -> dict:
    """Run the Flower simulation over devices already laid out under run_dir/devices/."""
    from flwr.simulation import run_simulation

    # Ray workers inherit the driver's environment on this machine; on a cluster, start the other
    # machines' `ray start` with BOUQUET_DEVICES_ROOT set to a shared folder.
    os.environ[DEVICES_ROOT_ENV] = str((run_dir / "devices").resolve())
    init_args: dict = {"include_dashboard": False}
    if ray_address:
        init_args["address"] = ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
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
