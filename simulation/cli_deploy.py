"""`bouquet coordinator ...` and `bouquet device ...`: the Deployment Engine, for an operator and for a device.

    bouquet coordinator init DIR [--host NAME ...] [--cert FILE --key FILE --ca FILE]
    bouquet coordinator start DIR [--host 0.0.0.0] [--port 8000]      (runs until SIGTERM / Ctrl-C)
    bouquet coordinator status DIR
    bouquet coordinator add-device DIR PUBKEY [--name NAME]  /  remove-device DIR NODE_ID
    bouquet coordinator run DIR share|assemble|all [--run-config "key=value" ...]
    bouquet coordinator withdraw DIR REQUEST_FILE
    bouquet device init DIR [--data FILE] [--test FILE]                 (prints the key to register)
    bouquet device start DIR --coordinator HOST:PORT --ca FILE [--port 9094] [--catalog DIR]
    bouquet device withdraw DIR --out REQUEST_FILE
    bouquet device add DIR --data FILE [--capacity 64 --rule sdss ...]    (records arriving, into the stream buffer)
    bouquet device annotate DIR --ask [--out FILE]  /  --answers FILE [--by NAME]
    bouquet device buffer DIR                                           (what the buffer holds)

`start` runs the Flower process as its child, forwards SIGTERM/SIGINT to it by process id, and kills it by
process id if it has not stopped after a grace period. The work lives in coordinator.service and
participants.device_setup; this module only parses and prints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 15.0


def supervise(cmd: list[str], env: dict, cwd: Path, ready=None, ready_message: str = "",
              ready_timeout: float = 120.0) -> int:
    """Run `cmd` until it exits; SIGTERM/SIGINT are forwarded to it by pid, then SIGKILL after GRACE_S.
    `ready()` is polled until true (then `ready_message` is printed) or the child exits."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd)  # in our process group: whoever stops the group stops it
    stop_asked: list[float] = []

    def forward(signum, frame) -> None:
        if not stop_asked:
            stop_asked.append(time.monotonic())
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline = time.monotonic() + ready_timeout
        while ready is not None and proc.poll() is None and not stop_asked:
            if ready():
                print(ready_message, flush=True)
                break
            if time.monotonic() > deadline:
                print(f"warning: not ready after {ready_timeout:.0f} s; still waiting on it", file=sys.stderr)
                break
            time.sleep(0.5)
        while proc.poll() is None:
            if stop_asked and time.monotonic() - stop_asked[0] > GRACE_S:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        code = proc.wait()
        if stop_asked and code in (0, -signal.SIGTERM, -signal.SIGINT):
            return 0  # stopped as asked
        return code if code >= 0 else 128 - code
    finally:
        if proc.poll() is None:  # an exception in here: never leave the child behind
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


# --- coordinator ----------------------------------------------------------------------------------------------


def add_coordinator(sub) -> None:
    p = sub.add_parser("coordinator", help="the coordinator service: a Flower SuperLink with TLS and SuperNode "
                                           "authentication beside a pool and a catalog that outlive runs")
    csub = p.add_subparsers(dest="coordinator_command", required=True)
    c = csub.add_parser("init", help="create the state folder: TLS material, SuperLink database path, pool, catalog")
    c.add_argument("dir")
    c.add_argument("--host", action="append", default=[],
                   help="a DNS name or IP address devices dial (repeatable); 127.0.0.1, localhost and ::1 always")
    c.add_argument("--cert", help="your own server certificate (PEM; must name 127.0.0.1 too)")
    c.add_argument("--key", help="its private key (PEM)")
    c.add_argument("--ca", help="the CA certificate that signed it (PEM); devices get this file")
    c.add_argument("--port", type=int, default=None, help="the port `start` uses by default (default 8000)")
    c.set_defaults(func=cmd_coordinator_init)
    c = csub.add_parser("start", help="run the SuperLink until SIGTERM or Ctrl-C")
    c.add_argument("dir")
    c.add_argument("--host", default=None, help="address to bind (default: the last one used, else 127.0.0.1; "
                                                "0.0.0.0 for devices on other machines)")
    c.add_argument("--port", type=int, default=None, help="its one HTTPS port (default: from init)")
    c.set_defaults(func=cmd_coordinator_start)
    c = csub.add_parser("status", help="registered devices and runs")
    c.add_argument("dir")
    c.add_argument("--json", action="store_true", help="print the nodes and runs as JSON")
    c.set_defaults(func=cmd_coordinator_status)
    c = csub.add_parser("add-device", help="register a device's SuperNode public key")
    c.add_argument("dir")
    c.add_argument("pubkey", help="the device's supernode.pub (a file, or its OpenSSH line)")
    c.add_argument("--name", default="", help="a name for the operator's records")
    c.set_defaults(func=cmd_coordinator_add_device)
    c = csub.add_parser("remove-device", help="unregister a device by node id")
    c.add_argument("dir")
    c.add_argument("node_id", type=int)
    c.set_defaults(func=cmd_coordinator_remove_device)
    c = csub.add_parser("run", help="one round as a `flwr run` on the service; exit 0 only on finished:completed")
    c.add_argument("dir")
    c.add_argument("phases", choices=("share", "assemble", "all"),
                   help="share: sharers train and share into the pool; assemble: nodes the pool holds nothing "
                        "of assemble from it; all: both")
    c.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                   help="more run settings, e.g. \"sharers=3\" or \"seed-model='tiny-random'\" (repeatable)")
    c.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for the run to finish")
    c.add_argument("--app", default=None, help="bouquet's source folder, if not where this package lives")
    c.set_defaults(func=cmd_coordinator_run)
    c = csub.add_parser("withdraw", help="apply a contributor's signed withdrawal request to the pool")
    c.add_argument("dir")
    c.add_argument("request", help="the request file (`bouquet device withdraw`)")
    c.set_defaults(func=cmd_coordinator_withdraw)


def cmd_coordinator_init(args) -> int:
    from coordinator.service import DEFAULT_PORT, init_coordinator

    home = init_coordinator(args.dir, args.host, args.cert, args.key, args.ca, args.port or DEFAULT_PORT)
    info = home.service()
    print(f"coordinator folder {home.root}: pool {home.pool_dir}, catalog {home.catalog}, port {info['port']}")
    print(f"devices need {home.ca} (the CA) and dial one of: 127.0.0.1, localhost, ::1"
          + "".join(f", {h}" for h in info.get("hosts", [])))
    return 0


def cmd_coordinator_start(args) -> int:
    from coordinator.service import CoordinatorHome, flower_env, healthy, superlink_command

    home = CoordinatorHome.at(args.dir)
    info = home.service()
    host, port = args.host or info.get("host", "127.0.0.1"), args.port or int(info["port"])
    if healthy(home, host, port):
        return _fail(RuntimeError(f"a SuperLink already answers on port {port}"))
    home.save_service(host=host, port=port)
    home.write_cli_config(host, port)
    return supervise(superlink_command(home, host, port), flower_env(home.link_home), home.link,
                     ready=lambda: healthy(home, host, port), ready_message=f"coordinator ready on {host}:{port}")


def cmd_coordinator_status(args) -> int:
    from coordinator.service import CoordinatorHome, nodes, runs

    home = CoordinatorHome.at(args.dir)
    home.service()
    try:
        found_nodes, found_runs = nodes(home), runs(home)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        return _fail(err)
    if args.json:
        print(json.dumps({"nodes": found_nodes, "runs": found_runs}, indent=1))
        return 0
    names = json.loads(home.devices_file.read_text()) if home.devices_file.exists() else {}
    print(f"{len(found_nodes)} device(s):")
    for n in found_nodes:
        name = names.get(str(n.get("node-id")), {}).get("name", "")
        print(f"  node {n.get('node-id')}  {n.get('status')}  {name}")
    print(f"{len(found_runs)} run(s):")
    for r in found_runs:
        print(f"  run {r.get('run-id')}  {r.get('status')}  {r.get('elapsed', '')}")
    return 0


def cmd_coordinator_add_device(args) -> int:
    from coordinator.service import CoordinatorHome, add_device

    try:
        node_id = add_device(CoordinatorHome.at(args.dir), args.pubkey, args.name)
    except RuntimeError as err:
        return _fail(err)
    print(node_id)
    return 0


def cmd_coordinator_remove_device(args) -> int:
    from coordinator.service import CoordinatorHome, remove_device

    try:
        remove_device(CoordinatorHome.at(args.dir), args.node_id)
    except RuntimeError as err:
        return _fail(err)
    print(f"node {args.node_id} unregistered")
    return 0


def cmd_coordinator_run(args) -> int:
    from coordinator.service import COMPLETED, CoordinatorHome, keep_run_record, submit_round, wait_for_run

    home = CoordinatorHome.at(args.dir)
    home.service()
    try:
        run_id = submit_round(home, args.phases, args.run_config, Path(args.app) if args.app else None)
        print(f"run {run_id} submitted ({args.phases})", flush=True)
        status = wait_for_run(home, run_id, args.timeout)
        metrics = keep_run_record(home, run_id)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        return _fail(err)
    sharers = metrics.get("sharers", {})
    print(f"run {run_id}: {status}; {len(sharers)} sharer(s), {len(metrics.get('newcomers', []))} newcomer(s), "
          f"pool {metrics.get('pool_pieces', '?')} pieces, {len(metrics.get('refused', []))} refused, "
          f"{len(metrics.get('unanswered', []))} unanswered")
    for line in metrics.get("unanswered", []) + metrics.get("refused", []):
        print(f"  {line}")
    print(json.dumps({"run-id": run_id, "status": status, "metrics": str(home.runs / f"{run_id}.metrics.json")}))
    return 0 if status == COMPLETED else 1


def cmd_coordinator_withdraw(args) -> int:
    from coordinator.service import CoordinatorHome, apply_withdrawal

    home = CoordinatorHome.at(args.dir)
    home.service()
    report = apply_withdrawal(home, Path(args.request).read_bytes())
    if not report["applied"]:
        print(f"request {report['request'][:16]}… was already applied; nothing removed")
    else:
        print(f"contributor {report['contributor']}: {len(report['removed'])} piece(s) removed from the pool")
    if report["seeds"]:
        print(f"catalog seeds built from its pieces (rebuild or drop them): {', '.join(report['seeds'])}")
    print(json.dumps(report | {"removed": len(report["removed"])}))
    return 0


# --- device ---------------------------------------------------------------------------------------------------


def add_device(sub) -> None:
    p = sub.add_parser("device", help="a real device: its folder, keys and limits, and its SuperNode")
    dsub = p.add_subparsers(dest="device_command", required=True)
    d = dsub.add_parser("init", help="create the device folder; prints the public key the operator registers")
    d.add_argument("dir")
    d.add_argument("--data", default=None, help="personal data, JSON Lines (see 'Personal data format'); leave it "
                                                "out for a device that takes its records as they come "
                                                "(`bouquet device add`)")
    d.add_argument("--test", default=None, help="held-out records for evaluation (optional)")
    d.set_defaults(func=cmd_device_init)
    d = dsub.add_parser("start", help="run this device's SuperNode until SIGTERM or Ctrl-C")
    d.add_argument("dir")
    d.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's address")
    d.add_argument("--ca", required=True, help="the coordinator's CA certificate (its tls/ca.crt)")
    d.add_argument("--port", type=int, default=9094, help="this SuperNode's local ClientApp port (default 9094; "
                                                         "two devices on one machine need two)")
    d.add_argument("--catalog", default=None, help="a local copy of the coordinator's seed catalog")
    d.set_defaults(func=cmd_device_start)
    d = dsub.add_parser("withdraw", help="write a request, signed with this device's key, to withdraw its pieces")
    d.add_argument("dir")
    d.add_argument("--out", required=True, help="where to write the request (give it to the operator)")
    d.set_defaults(func=cmd_device_withdraw)
    _add_stream_commands(dsub)


def _add_stream_commands(dsub) -> None:
    from participants.stream_settings import BufferSettings, SynthesisSettings
    from simulation.cli import add_settings_flags

    d = dsub.add_parser("add", help="records arriving on the device: score each in order and keep it in the "
                                    "stream buffer or not; the first addition creates the buffer with these flags")
    d.add_argument("dir")
    d.add_argument("--data", required=True, help="JSON Lines, one record a line; 'output' may be left out (the "
                                                 "owner has not annotated the item yet)")
    d.add_argument("--seed-model", default=None, help="the model whose hidden states score the items (first "
                                                      "addition only; default the embedded seed)")
    d.add_argument("--by", default="owner", help="who gave the outputs some records carry (kept with them)")
    add_settings_flags(d, BufferSettings, preset=True)
    add_settings_flags(d, SynthesisSettings, preset=True)
    d.set_defaults(func=cmd_device_add)
    d = dsub.add_parser("annotate", help="one annotation round: --ask writes the items to annotate (inputs), "
                                         "--answers records the owner's outputs for them and writes pairs like each")
    d.add_argument("dir")
    what = d.add_mutually_exclusive_group(required=True)
    what.add_argument("--ask", action="store_true", help="print (or --out) this round's items, outputs empty")
    what.add_argument("--answers", help="the asked records with their outputs filled in (JSON Lines)")
    d.add_argument("--out", default=None, help="with --ask: write the items here instead of printing them")
    d.add_argument("--by", default="owner", help="who annotated (kept with each item)")
    d.set_defaults(func=cmd_device_annotate)
    d = dsub.add_parser("buffer", help="what the stream buffer holds: size, annotations and by whom, memory")
    d.add_argument("dir")
    d.set_defaults(func=cmd_device_buffer)


def cmd_device_init(args) -> int:
    from participants.device_setup import init_device

    setup = init_device(args.dir, args.data, args.test)
    print(f"device folder {setup.device.root}: {setup.history} history, {setup.test} test record(s); "
          f"contributor id {setup.contributor}; limits in {setup.device.root / 'limits.json'}, privacy policy in "
          f"{setup.device.root / 'policy.json'}", file=sys.stderr)
    least = setup.device.policy().min_share_records
    if setup.history < least:
        print(f"note: this device answers every request but shares no pieces until it holds {least} records of its "
              f"own (policy.json \"min-share-records\": a few records trained on many times are memorised); lower "
              f"it there if you accept that", file=sys.stderr)
    print(f"register this key with the coordinator (`bouquet coordinator add-device DIR "
          f"{setup.device.supernode_pub_path}`):", file=sys.stderr)
    print(setup.supernode_public_key)
    return 0


def cmd_device_start(args) -> int:
    from participants.device import Device
    from participants.device_setup import supernode_command, supernode_env

    device = Device(Path(args.dir).expanduser().resolve())
    cmd = supernode_command(device, args.coordinator, args.ca, args.port, args.catalog)
    device.limits()  # a broken limits.json is an error now, not at the first message
    device.policy()  # so is a broken policy.json
    from participants.stream_buffer import BufferDamaged, load_buffer
    try:
        load_buffer(device.root)  # and a damaged stream buffer
    except BufferDamaged as err:
        return _fail(err)
    print(f"device {device.root}: SuperNode for {args.coordinator}", flush=True)
    return supervise(cmd, supernode_env(device), device.root)


def cmd_device_withdraw(args) -> int:
    from participants.device_setup import withdrawal_request
    from protocols.files import write_atomic

    out = Path(args.out).expanduser()
    write_atomic(out, withdrawal_request(args.dir).encode())
    print(f"wrote {out}: give it to the coordinator's operator (`bouquet coordinator withdraw DIR {out.name}`)")
    return 0


def cmd_device_add(args) -> int:
    from dataclasses import fields

    from participants.device_stream import add_records
    from participants.stream_buffer import BufferDamaged
    from participants.stream_settings import BufferSettings, SynthesisSettings

    names = [f.name for cls in (BufferSettings, SynthesisSettings) for f in fields(cls)]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        r = add_records(args.dir, args.data, seed_model=args.seed_model, given=given, by=args.by)
    except BufferDamaged as err:
        return _fail(err)
    if r.repeated:
        print(f"{args.data} was added before; nothing changed")
    print(f"{r.added} record(s) read, {r.kept} kept; buffer {r.size}/{r.capacity}, {r.awaiting} awaiting "
          f"annotation, {r.seen} seen in all")
    return 0


def cmd_device_annotate(args) -> int:
    from participants.device_stream import annotate, annotation_ask
    from participants.stream_buffer import BufferDamaged
    from protocols.files import write_atomic

    try:
        if args.ask:
            asked = annotation_ask(args.dir)
            text = "".join(json.dumps(json.loads(r.to_json()) | {"output": ""}, ensure_ascii=False) + "\n"
                           for r in asked)
            if args.out:
                write_atomic(Path(args.out), text.encode(), 0o600)
                print(f"{len(asked)} item(s) to annotate written to {args.out}: fill in each 'output', then "
                      f"`bouquet device annotate {args.dir} --answers {args.out}`", file=sys.stderr)
            else:
                sys.stdout.write(text)
            return 0
        done = annotate(args.dir, args.answers, by=args.by)
    except BufferDamaged as err:
        return _fail(err)
    for d in done:
        print(f"item {d['id']}: annotated; {d['kept']} of {d['written']} written pair(s) kept")
    return 0


def cmd_device_buffer(args) -> int:
    from participants.device_stream import buffer_status
    from participants.stream_buffer import BufferDamaged

    try:
        print(json.dumps(buffer_status(args.dir), indent=1))
    except BufferDamaged as err:
        return _fail(err)
    return 0
