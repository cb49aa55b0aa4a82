"""The coordinator service: a Flower SuperLink (TLS, SuperNode authentication, a persistent state database) beside
the pool and the catalog, which live in one state folder outside any run; each round is a `flwr run`.

    <dir>/service.json      host, port and the names the certificate carries
    <dir>/tls/              ca.crt (devices need it), ca.key, server.pem, server.key (keys 0600)
    <dir>/link/             the SuperLink's working directory (ServerApps inherit it): state.db, flwr-home/
    <dir>/cli/config.toml   the `flwr` CLI's connection "bouquet" (its FLWR_HOME): never a pyproject section,
                            which `flwr run` would rewrite
    <dir>/state/            the run settings' out-dir: pool/ (SQLite index + blobs) and metrics.json
    <dir>/catalog/          the seed catalog (`bouquet seeds build --out <dir>/catalog`), used when it holds one
    <dir>/runs/             per finished run: <id>.metrics.json, <id>.log
    <dir>/devices.json      the registered devices: node id -> name and public key

Everything here is the operator's side; devices reach the SuperLink's one HTTPS port only. The open-source
SuperLink does not authenticate its Control API: allowlist the port (README, "Deploy").
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.pool import PiecePool
from coordinator.tls import check_operator_files, make_ca_and_server
from protocols.files import write_atomic
from protocols.withdrawal import parse_withdrawal

CONNECTION = "bouquet"
DEFAULT_PORT = 8000
FLWR_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0"}
CONTRIBUTORS_FILE = "contributors.json"  # beside a pool-built seed's seed.json: the key ids it was made from
FINISHED = "finished:"
COMPLETED = "finished:completed"


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment every Flower process of the service gets: this interpreter's bin/ first on PATH (the
    SuperLink and SuperNode start flower-superexec by name), a private FLWR_HOME, no runtime installs, no
    update checks, no telemetry."""
    env = dict(os.environ) | FLWR_ENV | {"FLWR_HOME": str(flwr_home)}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def flower_tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if found is None:
        raise FileNotFoundError(f"{name} is not installed beside {sys.executable}; install flwr in this environment")
    return found


def client_host(host: str) -> str:
    """Where a process on this machine reaches a SuperLink bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "", "localhost", "127.0.0.1") else host


@dataclass(frozen=True)
class CoordinatorHome:
    root: Path

    @classmethod
    def at(cls, folder: str | Path) -> "CoordinatorHome":
        return cls(Path(folder).expanduser().resolve())

    tls = property(lambda self: self.root / "tls")
    ca = property(lambda self: self.tls / "ca.crt")
    server_cert = property(lambda self: self.tls / "server.pem")
    server_key = property(lambda self: self.tls / "server.key")
    link = property(lambda self: self.root / "link")
    database = property(lambda self: self.link / "state.db")
    link_home = property(lambda self: self.link / "flwr-home")
    cli_home = property(lambda self: self.root / "cli")
    state = property(lambda self: self.root / "state")
    pool_dir = property(lambda self: self.state / "pool")
    catalog = property(lambda self: self.root / "catalog")
    runs = property(lambda self: self.root / "runs")
    service_file = property(lambda self: self.root / "service.json")
    devices_file = property(lambda self: self.root / "devices.json")

    def service(self) -> dict:
        if not self.service_file.is_file():
            raise FileNotFoundError(f"{self.root} is not a coordinator folder; run `bouquet coordinator init "
                                    f"{self.root}` first")
        return json.loads(self.service_file.read_text())

    def save_service(self, **changes) -> dict:
        info = (self.service() if self.service_file.exists() else {}) | changes
        write_atomic(self.service_file, json.dumps(info, indent=1).encode())
        return info

    def write_cli_config(self, host: str, port: int) -> None:
        """$FLWR_HOME/config.toml of the `flwr` CLI, naming this service as the connection "bouquet"."""
        text = (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                f'address = "{client_host(host)}:{int(port)}"\nroot-certificates = "{self.ca}"\n')
        write_atomic(self.cli_home / "config.toml", text.encode(), 0o644)

    def catalog_setting(self) -> str:
        return str(self.catalog) if (self.catalog / "catalog.json").is_file() else ""


def init_coordinator(folder: str | Path, hosts: list[str], cert: str | None = None, key: str | None = None,
                     ca: str | None = None, port: int = DEFAULT_PORT) -> CoordinatorHome:
    """The state folder (0700 folders, 0600 keys, every file written atomically). TLS material is generated
    (a CA and a server certificate naming 127.0.0.1, localhost, ::1 and `hosts`) unless the operator gives all
    three of `cert`, `key` and `ca`. Existing TLS material is kept."""
    home = CoordinatorHome.at(folder)
    given = [x for x in (cert, key, ca) if x]
    if given and len(given) != 3:
        raise ValueError("give all three of --cert, --key and --ca, or none (then they are generated)")
    for sub in (home.root, home.tls, home.link, home.link_home, home.cli_home, home.state, home.catalog, home.runs):
        sub.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(sub, 0o700)
    if given:
        files = check_operator_files(Path(cert), Path(key), Path(ca))
    elif not home.server_cert.exists():
        files = make_ca_and_server(hosts)
    else:
        files = {}
    for name, data in files.items():
        write_atomic(home.tls / name, data, 0o600 if name.endswith(".key") else 0o644)
    info = home.save_service(port=int(home.service().get("port", port)) if home.service_file.exists() else port,
                             hosts=sorted(set(hosts) | set(home.service().get("hosts", []) if
                                                           home.service_file.exists() else [])))
    home.write_cli_config("127.0.0.1", info["port"])
    PiecePool(home.pool_dir).close()  # the pool exists from the start, at its fixed path
    if not home.devices_file.exists():
        write_atomic(home.devices_file, b"{}")
    return home


def superlink_command(home: CoordinatorHome, host: str, port: int) -> list[str]:
    return [flower_tool("flower-superlink"), "--ssl-ca-certfile", str(home.ca), "--ssl-certfile",
            str(home.server_cert), "--ssl-keyfile", str(home.server_key), "--enable-supernode-auth",
            "--database", str(home.database), "--host", host, "--port", str(int(port)),
            "--disable-runtime-dependency-installation"]


def healthy(home: CoordinatorHome, host: str, port: int) -> bool:
    ctx = ssl.create_default_context(cafile=str(home.ca))
    try:
        with urllib.request.urlopen(f"https://{client_host(host)}:{int(port)}/health", context=ctx, timeout=2):
            return True
    except OSError:
        return False


# --- the flwr CLI against the service ------------------------------------------------------------------------


def flwr(home: CoordinatorHome, *args: str, timeout: float = 120, cwd: Path | None = None) -> str:
    """Run `flwr ARGS` with the service's connection; stdout, or a RuntimeError with what flwr said."""
    proc = subprocess.run([flower_tool("flwr"), *args], env=flower_env(home.cli_home), cwd=cwd, timeout=timeout,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"flwr {' '.join(args[:2])} failed ({proc.returncode}): "
                           f"{(proc.stdout + proc.stderr).strip()[-2000:]}")
    return proc.stdout


def flwr_json(home: CoordinatorHome, *args: str, timeout: float = 120, cwd: Path | None = None) -> dict:
    out = flwr(home, *args, "--format", "json", timeout=timeout, cwd=cwd)
    try:
        data = json.loads(out[out.index("{"):])
    except ValueError:
        raise RuntimeError(f"flwr {' '.join(args[:2])} did not answer JSON: {out.strip()[-500:]}") from None
    if data.get("success") is False:
        raise RuntimeError(f"flwr {' '.join(args[:2])}: {data.get('error-message', data)}")
    return data


def nodes(home: CoordinatorHome) -> list[dict]:
    return list(flwr_json(home, "supernode", "list", CONNECTION).get("nodes", []))


def runs(home: CoordinatorHome, run_id: int | None = None) -> list[dict]:
    extra = ("--run-id", str(run_id)) if run_id is not None else ()
    return list(flwr_json(home, "ls", CONNECTION, *extra).get("runs", []))


def read_public_key(text_or_path: str) -> bytes:
    """An OpenSSH EC public key line, given as itself or as a file; refused unless EC on a NIST curve."""
    path = Path(text_or_path).expanduser()
    raw = path.read_bytes().strip() if not text_or_path.startswith("ecdsa-") and path.is_file() \
        else text_or_path.strip().encode()
    try:
        key = serialization.load_ssh_public_key(raw)
    except ValueError as err:
        raise ValueError(f"not an OpenSSH public key ({err}); give the device's supernode.pub") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("a SuperNode key must be an EC key on a NIST curve (`bouquet device init` makes one)")
    return raw


def add_device(home: CoordinatorHome, public_key: str, name: str = "") -> int:
    raw = read_public_key(public_key)
    tmp = home.root / f".register.{os.getpid()}.pub"
    write_atomic(tmp, raw + b"\n", 0o644)
    try:
        args = ["supernode", "register", str(tmp), CONNECTION] + (["--name", name] if name else [])
        node_id = int(flwr_json(home, *args)["node-id"])
    finally:
        tmp.unlink(missing_ok=True)
    devices = json.loads(home.devices_file.read_text()) if home.devices_file.exists() else {}
    devices[str(node_id)] = {"name": name, "public-key": raw.decode()}
    write_atomic(home.devices_file, json.dumps(devices, indent=1).encode())
    return node_id


def remove_device(home: CoordinatorHome, node_id: int) -> None:
    flwr_json(home, "supernode", "unregister", str(int(node_id)), CONNECTION)
    devices = json.loads(home.devices_file.read_text()) if home.devices_file.exists() else {}
    devices.pop(str(int(node_id)), None)
    write_atomic(home.devices_file, json.dumps(devices, indent=1).encode())


# --- rounds ---------------------------------------------------------------------------------------------------


def app_dir() -> Path:
    """The Flower app bouquet runs: the project folder holding pyproject.toml with [tool.flwr.app]."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or "[tool.flwr.app]" not in (root / "pyproject.toml").read_text():
        raise FileNotFoundError(f"no Flower app at {root} (a pyproject.toml with [tool.flwr.app]); pass --app "
                                f"with bouquet's source folder")
    return root


def round_config(home: CoordinatorHome, phases: str, extra: list[str]) -> list[str]:
    """The run-config pairs of a round: the fixed pool and catalog of the state folder, what it does, and the
    operator's own pairs (later ones win)."""
    for path in (home.state, home.catalog):
        if "'" in str(path):
            raise ValueError(f"{path} contains a single quote, which a run-config value cannot carry")
    pairs = [f"out-dir='{home.state}'", f"phases='{phases}'"]
    if home.catalog_setting():
        pairs.append(f"catalog='{home.catalog_setting()}'")
    return pairs + list(extra)


def submit_round(home: CoordinatorHome, phases: str, extra: list[str], app: Path | None = None) -> int:
    args = ["run", str(app or app_dir()), CONNECTION]
    for pair in round_config(home, phases, extra):
        args += ["--run-config", pair]
    return int(flwr_json(home, *args, timeout=600)["run-id"])


def wait_for_run(home: CoordinatorHome, run_id: int, timeout: float, poll_s: float = 2.0) -> str:
    """Poll `flwr ls --run-id` until the run is finished:*; its status ("timeout" if it never finishes).
    `flwr run --stream` exits 0 even when the ServerApp fails, so the status is the only word to trust."""
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline:
        found = runs(home, run_id)
        status = str(found[0].get("status", "unknown")) if found else "unknown"
        if status.startswith(FINISHED):
            return status
        time.sleep(poll_s)
    return f"timeout (last status {status})"


def keep_run_record(home: CoordinatorHome, run_id: int) -> dict:
    """Copy the run's metrics.json and log into runs/; the metrics (empty when the run wrote none)."""
    metrics_path = home.state / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    write_atomic(home.runs / f"{run_id}.metrics.json", json.dumps(metrics, indent=1).encode(), 0o644)
    try:
        write_atomic(home.runs / f"{run_id}.log", flwr(home, "log", str(run_id), CONNECTION, "--show",
                                                       timeout=60).encode(), 0o644)
    except (RuntimeError, subprocess.TimeoutExpired):
        pass
    return metrics


# --- withdrawal -----------------------------------------------------------------------------------------------


def seeds_built_from(catalog: Path, contributor: str) -> list[str]:
    """The catalog seeds whose recorded contributors include `contributor` (catalog_build.from_pool records
    them in each pool-built seed's contributors.json)."""
    touched = []
    for record in sorted((catalog / "seeds").glob(f"*/{CONTRIBUTORS_FILE}")):
        try:
            if contributor in json.loads(record.read_text()):
                touched.append(record.parent.name)
        except ValueError:
            touched.append(f"{record.parent.name} (unreadable {CONTRIBUTORS_FILE})")
    return touched


def apply_withdrawal(home: CoordinatorHome, request_text: str | bytes) -> dict:
    """Check a withdrawal request (protocols.withdrawal), remove the contributor's pieces from the pool (index
    and blobs), and name the catalog seeds built from them, which the operator rebuilds or drops."""
    request = parse_withdrawal(request_text)
    with PiecePool(home.pool_dir) as pool:
        removed, new = pool.withdraw(request.contributor, request.request_id)
    return {"contributor": request.contributor, "request": request.request_id, "signed": request.time,
            "applied": new, "removed": removed, "seeds": seeds_built_from(home.catalog, request.contributor)}
