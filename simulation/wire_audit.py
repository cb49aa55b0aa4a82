"""The message audit: what crossed the wire in a simulation, searched for what must never cross it.

`auditing_server_app` is the coordinator's ServerApp with its Grid wrapped (`RecordingGrid`): every message the
coordinator sends and every reply it receives, error replies included, is kept as the bytes Flower puts on the wire
(its protobuf serialization) followed by a plain rendering of every config and metric value, JSON inside a text
decoded again, so that nothing escapes the search by being escaped. `private_texts` lists what a virtual
device must keep to itself: its user name, its folder's path, and every 20-character window of its history and
held-out records; `leaks` finds any of them in what was recorded or written.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from contextlib import contextmanager
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid, ServerApp

from coordinator.server_app import run_round
from coordinator.settings import RunSettings
from simulation.user_data import UserData

WINDOW = 20  # characters of a record that may never appear anywhere the coordinator sees


def _plain(value) -> str:
    """A config value as readable text; a text holding JSON (the catalog, piece metadata) decoded once more."""
    if isinstance(value, list):
        return "\n".join(_plain(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return value + "\n" + json.dumps(decoded, ensure_ascii=False)
    return str(value)


def message_bytes(msg: Message) -> bytes:
    """The message as it travels (Flower's protobuf), then every record's values as plain text."""
    parts = [message_to_proto(msg).SerializeToString()]
    if msg.has_error():
        parts.append(str(msg.error.reason).encode())
    if msg.has_content():
        for name, record in msg.content.items():
            if isinstance(record, ArrayRecord):
                parts.extend(name.encode() + b"\n" + key.encode() + b"\n" + arr.data
                             for key, arr in record.items())
            else:
                parts.append("\n".join(f"{name}.{k}: {_plain(v)}" for k, v in record.items()).encode())
    return b"\n".join(parts)


class RecordingGrid:
    """A Grid that keeps every message sent and every reply received, as (direction, message type, bytes)."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.messages: list[tuple[str, str, bytes]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *args, **kwargs) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, *args, **kwargs))
        with self._lock:
            self.messages += [("sent", m.metadata.message_type, message_bytes(m)) for m in messages]
            self.messages += [("received", r.metadata.message_type, message_bytes(r)) for r in replies]
        return replies


@contextmanager
def coordinator_log():
    """Everything the coordinator side logs (bouquet's and Flower's loggers) while inside, as a StringIO."""
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    loggers = [logging.getLogger(name) for name in ("bouquet", "flwr")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield captured
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def auditing_server_app(settings: RunSettings, grid_box: list) -> ServerApp:
    """The coordinator's round over a RecordingGrid, which is appended to `grid_box` for the caller to read."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        recording = RecordingGrid(grid)
        grid_box.append(recording)
        run_round(recording, settings)

    return server


def private_texts(users: list[UserData], run_dir: Path, public: Iterable[str] = ()) -> set[str]:
    """Each user's name and device folder, and every WINDOW-character window of its records' inputs and outputs,
    less the windows that also occur in `public` texts (what the coordinator itself published, e.g. the catalog)."""
    published = "\n".join(public)
    found = set()
    for pid, user in enumerate(users):
        found |= {user.user, str((run_dir / "devices" / str(pid)).resolve())}
        for rec in [*user.history, *user.test]:
            for text in (rec.input, rec.output):
                found |= {text[i:i + WINDOW] for i in range(len(text) - WINDOW + 1)}
    return {t for t in found if t.strip() and t not in published}


def leaks(blobs: dict[str, bytes], secrets: Iterable[str]) -> list[str]:
    """'<where>: <secret>' for every secret found in a blob (named by where it came from).

    A real run searches some 10^5 windows in tens of MB of messages, too many for one `in` each. Every secret of at
    least WINDOW bytes is found by a hash of its first WINDOW bytes among the hashes of every WINDOW-byte window of
    the blob (numpy, chunk by chunk), each hit then compared byte for byte; shorter ones (names) by `in`."""
    encoded = {s: s.encode() for s in secrets}
    short = [(s, raw) for s, raw in encoded.items() if len(raw) < WINDOW]
    by_prefix: dict[int, list[tuple[str, bytes]]] = {}
    for s, raw in encoded.items():
        if len(raw) >= WINDOW:
            by_prefix.setdefault(int(_window_hashes(raw[:WINDOW])[0]), []).append((s, raw))
    prefixes = np.sort(np.fromiter(by_prefix, dtype=np.uint64, count=len(by_prefix)))
    found = []
    for where, blob in blobs.items():
        hits = {s for s, raw in short if raw in blob}
        for start in range(0, max(len(blob) - WINDOW + 1, 0), _CHUNK):
            part = blob[start:start + _CHUNK + WINDOW - 1]
            for offset in _members(_window_hashes(part), prefixes):
                at = start + int(offset)
                for s, raw in by_prefix[int(_window_hashes(blob[at:at + WINDOW])[0])]:
                    if blob[at:at + len(raw)] == raw:
                        hits.add(s)
        found += [f"{where}: {s!r}" for s in sorted(hits)]
    return found


_CHUNK = 1 << 22  # bytes of a blob hashed at once: 32 MiB of window hashes
_PRIME = np.uint64(1099511628211)


def _members(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Indices of `values` found in `sorted_set`."""
    if not len(sorted_set):
        return np.zeros(0, dtype=np.int64)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return np.flatnonzero(sorted_set[at] == values)


def _window_hashes(data: bytes) -> np.ndarray:
    """A polynomial hash (mod 2^64) of every WINDOW-byte window of `data`."""
    b = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    n = len(b) - WINDOW + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(n, dtype=np.uint64)
    for k in range(WINDOW):
        h = h * _PRIME + b[k:k + n]
    return h


HARNESS_FILES = {"devices", "adapters", "devices.json", "summary.json", "wire-audit.json"}  # the harness's side


def coordinator_blobs(run_dir: Path, grid: RecordingGrid, coordinator_log: str) -> dict[str, bytes]:
    """Everything the coordinator saw or wrote in a run: each message, each file of its own, its log."""
    blobs = {f"message {i}: {direction} {kind}": data for i, (direction, kind, data) in enumerate(grid.messages)}
    for path in run_dir.rglob("*"):
        if path.is_file() and path.relative_to(run_dir).parts[0] not in HARNESS_FILES:
            blobs[str(path.relative_to(run_dir))] = path.read_bytes()
    blobs["the coordinator's log"] = coordinator_log.encode()
    return blobs


def audit_run(users: list[UserData], run_dir: Path, grid: RecordingGrid, coordinator_log: str,
              public: Iterable[str] = ()) -> dict:
    """The audit of one run, as `bouquet simulate --audit-wire` writes it to wire-audit.json."""
    secrets = private_texts(users, run_dir, public)
    blobs = coordinator_blobs(run_dir, grid, coordinator_log)
    found = leaks(blobs, secrets)
    kinds: dict[str, int] = {}
    for direction, kind, _ in grid.messages:
        kinds[f"{direction} {kind}"] = kinds.get(f"{direction} {kind}", 0) + 1
    return {"messages": len(grid.messages), "by-kind": kinds, "message-bytes": sum(len(d) for _, _, d in grid.messages),
            "coordinator-files": sum(1 for k in blobs if not k.startswith("message ")) - 1,
            "secrets-searched": len(secrets), "users": len(users), "window": WINDOW, "leaks": found}
