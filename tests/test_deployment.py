"""The coordinator service and the device: state folders, keys, limits, withdrawal, and one loopback deployment.

The integration test runs the real thing on 127.0.0.1: `bouquet coordinator start` (a SuperLink with TLS,
SuperNode authentication and a persistent database), `bouquet device start` for each device (a SuperNode), and
rounds as `bouquet coordinator run` (`flwr run`, then `flwr ls` until finished). Every process it starts is
started as the leader of its own process group and stopped by that id: TERM, then KILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.pool import PiecePool
from coordinator.service import CONTRIBUTORS_FILE, apply_withdrawal, init_coordinator, round_config
from coordinator.tls import certificate_names, check_operator_files, make_ca_and_server
from participants.device import Device
from participants.device_setup import init_device, supernode_command, withdrawal_request
from participants.limits import DeviceLimits, LimitExceeded
from participants.privacy_policy import MIN_SHARE_RECORDS
from protocols.records import DataFormatError
from protocols.settings import ParticipantSettings
from protocols.withdrawal import WithdrawalError, make_withdrawal, parse_withdrawal

BOUQUET = str(Path(sys.executable).parent / "bouquet")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_data(path: Path, user: str, n: int = 6) -> Path:
    path.write_text("".join(json.dumps({"user": user, "input": f"question {i} from {user}?",
                                        "output": f"{user} answers {i} in its own words."}) + "\n"
                            for i in range(n)))
    return path


# --- the device folder ----------------------------------------------------------------------------------------


def test_device_init_makes_a_private_folder_with_both_keys(tmp_path):
    setup = init_device(tmp_path / "dev", write_data(tmp_path / "d.jsonl", "ann"))
    root = setup.device.root
    assert mode(root) == 0o700
    for name in ("history.jsonl", "key.pem", "supernode.key", "limits.json"):
        assert mode(root / name) == 0o600, name
    node_key = serialization.load_ssh_private_key((root / "supernode.key").read_bytes(), password=None)
    assert isinstance(node_key, ec.EllipticCurvePrivateKey) and node_key.curve.name == "secp384r1"
    assert setup.supernode_public_key.startswith("ecdsa-sha2-nistp384 ")
    assert (root / "supernode.pub").read_text().strip() == setup.supernode_public_key
    assert len(setup.device.history()) == 6
    assert DeviceLimits.load(root / "limits.json") == DeviceLimits()
    assert not list(root.glob(".*.tmp"))
    # init again: new data, same identity
    again = init_device(root, write_data(tmp_path / "e.jsonl", "ann", 3))
    assert again.supernode_public_key == setup.supernode_public_key and again.contributor == setup.contributor
    assert len(again.device.history()) == 3


def test_device_init_refuses_bad_data_and_keeps_nothing_half_written(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "ann", "input": "x"}\n')
    with pytest.raises(DataFormatError, match="bad.jsonl.*output"):
        init_device(tmp_path / "dev", bad)
    assert not (tmp_path / "dev" / "history.jsonl").exists()


def test_supernode_command_names_the_key_the_folder_and_the_ca(tmp_path):
    setup = init_device(tmp_path / "dev", write_data(tmp_path / "d.jsonl", "ann"))
    cmd = supernode_command(setup.device, "link.example.org:8000", tmp_path / "ca.crt", 9099)
    assert cmd[0].endswith("flower-supernode")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(setup.device.supernode_key_path)
    assert cmd[cmd.index("--node-config") + 1] == f"device-dir='{setup.device.root}'"
    assert cmd[cmd.index("--superlink") + 1] == "link.example.org:8000" and "--insecure" not in cmd


# --- the device's limits --------------------------------------------------------------------------------------


def test_limits_refuse_a_request_beyond_them_naming_the_limit(tmp_path):
    limits = DeviceLimits(lora_steps=10, max_len=64)
    limits.check_settings(ParticipantSettings(lora_steps=10, max_len=64))
    with pytest.raises(LimitExceeded, match=r"lora-steps 1000 > 10.*max-len 128 > 64"):
        limits.check_settings(ParticipantSettings(lora_steps=1000, max_len=128))
    with pytest.raises(LimitExceeded, match="piece-bytes 2000 > 1000"):
        DeviceLimits(piece_bytes=1000).check_download("piece-bytes", 2000)
    (tmp_path / "limits.json").write_text('{"lora-steps": 5, "max-lenn": 3}')
    with pytest.raises(ValueError, match="max-lenn"):
        DeviceLimits.load(tmp_path / "limits.json")
    (tmp_path / "limits.json").write_text('{"lora-steps": 5}')
    assert DeviceLimits.load(tmp_path / "limits.json") == DeviceLimits(lora_steps=5)


def test_the_client_app_refuses_a_message_beyond_the_devices_limits(tmp_path):
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, Context, RecordDict

    from participants.client_app import _request
    from protocols import messages as M

    setup = init_device(tmp_path / "dev", write_data(tmp_path / "d.jsonl", "ann"))
    (setup.device.root / "limits.json").write_text('{"lora-steps": 5}')
    msg = SimpleNamespace(content=RecordDict({M.CONFIG: ConfigRecord({"lora-steps": 50})}))  # what it reads
    context = Context(run_id=1, node_id=1, node_config={"device-dir": str(setup.device.root)}, state=RecordDict(),
                      run_config={})
    with pytest.raises(ValueError, match="lora-steps 50 > 5"):
        _request(msg, context)
    ok = SimpleNamespace(content=RecordDict({M.CONFIG: ConfigRecord({"lora-steps": 5})}))
    assert _request(ok, context)[0].lora_steps == 5
    # a simulated device (the harness is its owner) has no limits unless its folder sets some
    assert Device(tmp_path, simulated=True).limits().lora_steps > 10**9


# --- the coordinator's folder and TLS -------------------------------------------------------------------------


def test_coordinator_init_makes_tls_that_names_loopback_and_the_hosts(tmp_path):
    home = init_coordinator(tmp_path / "c", ["link.example.org", "10.1.2.3"], port=19000)
    assert mode(home.root) == 0o700 and mode(home.tls) == 0o700
    assert mode(home.server_key) == 0o600 and mode(home.tls / "ca.key") == 0o600
    names = certificate_names(home.server_cert.read_bytes())
    assert {"127.0.0.1", "localhost", "::1", "link.example.org", "10.1.2.3"} <= set(names)
    ca = x509.load_pem_x509_certificate(home.ca.read_bytes())
    x509.load_pem_x509_certificate(home.server_cert.read_bytes()).verify_directly_issued_by(ca)
    assert (home.pool_dir / "index.sqlite").is_file()
    config = (home.cli_home / "config.toml").read_text()
    assert 'address = "127.0.0.1:19000"' in config and str(home.ca) in config
    assert "federations" not in (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    # a second init keeps the CA the devices already trust
    before = home.ca.read_bytes()
    init_coordinator(tmp_path / "c", [])
    assert home.ca.read_bytes() == before
    # a round points at the folder's pool, by absolute path
    pairs = round_config(home, "share", ["sharers=3"])
    assert pairs[:2] == [f"out-dir='{home.state}'", "phases='share'"] and pairs[-1] == "sharers=3"


def test_operator_files_without_127_0_0_1_are_refused(tmp_path):
    files = make_ca_and_server(["link.example.org"])
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    check_operator_files(tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.crt")
    # a certificate naming only the public host: the SuperLink's own SuperExec could not dial it
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ca_key = load_pem_private_key(files["ca.key"], None)
    ca = x509.load_pem_x509_certificate(files["ca.crt"])
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("link.example.org")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "bad.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ValueError, match="127.0.0.1"):
        check_operator_files(tmp_path / "bad.pem", tmp_path / "server.key", tmp_path / "ca.crt")
    with pytest.raises(ValueError, match="give all three"):
        init_coordinator(tmp_path / "c", [], cert=str(tmp_path / "server.pem"))


# --- withdrawal -----------------------------------------------------------------------------------------------


def test_a_withdrawal_request_verifies_and_a_forged_one_does_not():
    key = Ed25519PrivateKey.generate()
    request = make_withdrawal(key)
    parsed = parse_withdrawal(request.to_json())
    assert parsed.contributor == request.contributor and parsed.request_id == request.request_id
    body = json.loads(request.to_json())
    other = make_withdrawal(Ed25519PrivateKey.generate())
    for change, message in [({"contributor": other.contributor}, "not the key id"),
                            ({"nonce": "00" * 16}, "does not verify"),
                            ({"signature": json.loads(other.to_json())["signature"]}, "does not verify"),
                            ({"public-key": "01" + "00" * 31, "contributor": "x"}, "small-order"),
                            ({"kind": "bouquet.piece"}, "not a bouquet.withdrawal"),
                            ({"extra": 1}, "unknown")]:
        with pytest.raises(WithdrawalError, match=message):
            parse_withdrawal(json.dumps(body | change))
    with pytest.raises(WithdrawalError, match="at most"):
        parse_withdrawal(" " * 5000)


def _piece_for(key, pool: PiecePool, position: str = "layers.0.q_proj"):
    from coordinator.validation import RegisteredSeed
    from protocols.pieces import Piece

    rng = np.random.default_rng(abs(hash(position)) % 1000)
    if not pool.seeds():
        pool.register_seed(RegisteredSeed("tiny", "h" * 64, {position: (16, 16)}))
    piece = Piece(seed_id="tiny", seed_hash="h" * 64, position=position, rank=2, alpha=4.0,
                  A=(rng.standard_normal((2, 16)) * 0.01).astype(np.float32),
                  B=(rng.standard_normal((16, 2)) * 0.01).astype(np.float32),
                  gate=np.zeros(16, dtype=np.float32))
    return piece.signed(key)


def test_withdrawal_removes_index_rows_and_blobs_once_and_names_the_seeds(tmp_path):
    home = init_coordinator(tmp_path / "c", [])
    dev = init_device(tmp_path / "dev", write_data(tmp_path / "d.jsonl", "ann"))
    other = Ed25519PrivateKey.generate()
    with PiecePool(home.pool_dir) as pool:
        try:
            mine = pool.add(_piece_for(dev.device.key(), pool))
            theirs = pool.add(_piece_for(other, pool))
        except Exception as err:  # noqa: BLE001: the piece format is another test's subject
            pytest.skip(f"cannot make a test piece here: {err}")
    (home.catalog / "seeds" / "cluster1").mkdir(parents=True)
    (home.catalog / "seeds" / "cluster1" / CONTRIBUTORS_FILE).write_text(json.dumps([dev.contributor]))
    (home.catalog / "seeds" / "cluster2").mkdir(parents=True)
    (home.catalog / "seeds" / "cluster2" / CONTRIBUTORS_FILE).write_text(json.dumps(["someone-else"]))
    request = withdrawal_request(dev.device.root)
    report = apply_withdrawal(home, request)
    assert report["applied"] and report["removed"] == [mine] and report["seeds"] == ["cluster1"]
    with PiecePool(home.pool_dir) as pool:
        assert pool.count() == 1 and [p.piece_id for p in pool.get([theirs])] == [theirs]
        with pytest.raises(KeyError):
            pool.get([mine])
        assert dev.contributor not in pool.contributors()
        assert not list(pool.blobs.glob(f"*/{mine}.safetensors"))
        assert [p for p in pool.verify() if "orphan" in p] == []
        # shares again later: a replay of the old request removes nothing
        again = pool.add(_piece_for(dev.device.key(), pool, "layers.0.q_proj"))
    replay = apply_withdrawal(home, request)
    assert not replay["applied"] and replay["removed"] == []
    with PiecePool(home.pool_dir) as pool:
        assert again in {pid for pid, *_ in pool.gates("tiny")}


def test_cli_device_withdraw_then_coordinator_withdraw(tmp_path):
    from simulation.cli import main

    home = init_coordinator(tmp_path / "c", [])
    init_device(tmp_path / "dev", write_data(tmp_path / "d.jsonl", "ann"))
    assert main(["device", "withdraw", str(tmp_path / "dev"), "--out", str(tmp_path / "req.json")]) == 0
    assert mode(tmp_path / "req.json") == 0o600
    assert main(["coordinator", "withdraw", str(home.root), str(tmp_path / "req.json")]) == 0


def test_the_pool_stays_consistent_under_concurrent_adds_and_a_withdrawal(tmp_path):
    import threading

    key = Ed25519PrivateKey.generate()
    root = tmp_path / "pool"
    with PiecePool(root) as pool:
        try:
            pool.add(_piece_for(key, pool, "layers.0.q_proj"))
        except Exception as err:  # noqa: BLE001
            pytest.skip(f"cannot make a test piece here: {err}")
    errors = []

    def adder(i: int) -> None:
        try:
            with PiecePool(root) as p:
                for j in range(6):
                    p.add(_piece_for(key, p, "layers.0.q_proj") if j == 0 else _piece_for(
                        Ed25519PrivateKey.generate(), p, "layers.0.q_proj"))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=adder, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    with PiecePool(root) as pool:
        pool.withdraw("not-a-contributor", "r0")
        pool.withdraw(parse_withdrawal(make_withdrawal(key).to_json()).contributor, "r1")
    for t in threads:
        t.join()
    assert not errors
    with PiecePool(root) as pool:
        ids = [pid for pid, *_ in pool.gates("tiny")]
        assert all(pool._blob_path(pid).is_file() for pid in ids)  # every index row has its blob


# --- the loopback deployment ----------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Processes:
    """Every process the test starts, each the leader of its own process group; stopped by that id."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115: closed with the process
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([BOUQUET, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        proc.log_file = log
        self.running[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            proc = self.running[name]
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name}: no {text!r} (exit {proc.poll()}): {self.log(name)[-3000:]}")
            time.sleep(0.5)

    def stop(self, name: str, grace: float = 20.0) -> int:
        """TERM to the process (it forwards to its Flower child), then KILL to its group."""
        proc = self.running.pop(name)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its group (its Flower child, SuperExec)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        proc.log_file.close()
        return proc.returncode

    def kill(self, name: str) -> None:
        """SIGKILL, as a device losing power: the whole group at once."""
        os.killpg(self.running[name].pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name, grace=10.0)


def bouquet(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([BOUQUET, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


def node_status(coord: Path) -> dict[int, str]:
    out = bouquet("coordinator", "status", str(coord), "--json")
    assert out.returncode == 0, out.stderr
    return {int(n["node-id"]): n["status"] for n in json.loads(out.stdout)["nodes"]}


def wait_online(coord: Path, wanted: set[int], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = node_status(coord)
        if all(status.get(n) == "online" for n in wanted):
            return
        assert time.monotonic() < deadline, f"not all of {wanted} online: {status}"
        time.sleep(1)


TINY_ROUND = ["--run-config", "seed-model='tiny-random'",
              "--run-config", "lora-steps=2 gate-steps=1 max-len=32 batch-size=2 generate=false "
                              "max-new-tokens=8 rng-seed=0"]


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_loopback_deployment_with_tls_auth_a_killed_node_a_restart_and_a_late_newcomer(tmp_path):
    started = time.monotonic()
    port, *node_ports = free_ports(6)
    coord = tmp_path / "coord"
    procs = Processes(tmp_path)
    try:
        assert bouquet("coordinator", "init", str(coord), "--port", str(port)).returncode == 0
        procs.start("link", "coordinator", "start", str(coord))
        devices = {}
        for i, user in enumerate(["ann", "bob", "cid", "dee", "eve"], start=1):
            root = tmp_path / f"dev{i}"
            out = bouquet("device", "init", str(root), "--data", str(write_data(tmp_path / f"{user}.jsonl", user)),
                          *(["--test", str(write_data(tmp_path / f"{user}-test.jsonl", user, 2))] if i == 4 else []))
            assert out.returncode == 0, out.stderr
            assert f"shares no pieces until it holds {MIN_SHARE_RECORDS} records" in out.stderr  # 6: lowered
            (root / "policy.json").write_text(json.dumps({"min-share-records": 1}))
            devices[i] = (root, out.stdout.strip())
        procs.wait_for_log("link", "coordinator ready", 120)
        ca = str(coord / "tls" / "ca.crt")

        def start_device(i: int):
            return procs.start(f"dev{i}", "device", "start", str(devices[i][0]), "--coordinator",
                               f"127.0.0.1:{port}", "--ca", ca, "--port", str(node_ports[i - 1]))

        node = {}
        for i in (1, 2, 3):
            out = bouquet("coordinator", "add-device", str(coord), devices[i][1], "--name", f"dev{i}")
            assert out.returncode == 0, out.stderr
            node[i] = int(out.stdout.strip())
            start_device(i)
        # a device whose key was never registered is refused
        start_device(5)
        wait_online(coord, {node[1], node[2], node[3]})
        procs.running["dev5"].wait(90)
        assert procs.running["dev5"].returncode != 0
        assert "Failed to activate" in procs.log("dev5") or "305" in procs.log("dev5")
        procs.stop("dev5")

        # the sharers' round; dev3 is killed (SIGKILL) once its share message has arrived
        share = procs.start("share", "coordinator", "run", str(coord), "share", *TINY_ROUND,
                            "--run-config", "sharers=3 newcomers=0 min-nodes=3 timeout=240", "--timeout", "600")
        procs.wait_for_log("dev3", "Receiving: train.share", 400)
        procs.kill("dev3")
        assert share.wait(600) == 0, procs.log("share")
        share_id = int(json.loads(procs.log("share").strip().splitlines()[-1])["run-id"])
        metrics = json.loads((coord / "runs" / f"{share_id}.metrics.json").read_text())
        assert sorted(metrics["sharers"]) == sorted([str(node[1]), str(node[2])]), metrics  # node ids, no names
        leaks = [f"from {u}?" for u in ("ann", "bob", "cid")] + [f"{u} answers" for u in ("ann", "bob", "cid")]
        assert not any(text in json.dumps(metrics) for text in leaks + [str(tmp_path / f"dev{i}") for i in (1, 2, 3)])
        assert any(line.startswith("share:") for line in metrics["unanswered"]), metrics["unanswered"]
        with PiecePool(coord / "state" / "pool") as pool:
            before = sorted(pid for seed in pool.seeds() for pid, *_ in pool.gates(seed.seed_id))
            contributors = set(pool.contributors())
        assert before and len(contributors) == 2

        # the coordinator restarts between the rounds: runs, nodes and the pool survive
        assert procs.stop("link") == 0
        procs.start("link-again", "coordinator", "start", str(coord))
        procs.wait_for_log("link-again", "coordinator ready", 120)
        wait_online(coord, {node[1], node[2]})
        runs = json.loads(bouquet("coordinator", "status", str(coord), "--json").stdout)["runs"]
        assert any(int(r["run-id"]) == share_id and r["status"] == "finished:completed" for r in runs), runs
        with PiecePool(coord / "state" / "pool") as pool:
            assert sorted(pid for seed in pool.seeds() for pid, *_ in pool.gates(seed.seed_id)) == before

        # a newcomer joins later and assembles from what the pool holds
        out = bouquet("coordinator", "add-device", str(coord), str(devices[4][0] / "supernode.pub"))
        node[4] = int(out.stdout.strip())
        start_device(4)
        wait_online(coord, {node[1], node[2], node[4]})
        out = bouquet("coordinator", "run", str(coord), "assemble", *TINY_ROUND,
                      "--run-config", "newcomers=1 min-nodes=3 timeout=240", "--timeout", "600", timeout=700)
        assert out.returncode == 0, out.stdout + out.stderr
        run_id = int(json.loads(out.stdout.strip().splitlines()[-1])["run-id"])
        metrics = json.loads((coord / "runs" / f"{run_id}.metrics.json").read_text())
        assert [row["node"] for row in metrics["newcomers"]] == [node[4]], metrics
        assert metrics["newcomers"][0]["pieces-received"] > 0 and metrics["sharers"] == {}
        assert (devices[4][0] / "adapter" / "adapter_config.json").is_file()
        with PiecePool(coord / "state" / "pool") as pool:
            assert sorted(pid for seed in pool.seeds() for pid, *_ in pool.gates(seed.seed_id)) == before
        print(f"loopback deployment: {time.monotonic() - started:.0f} s")
    finally:
        procs.stop_all()
