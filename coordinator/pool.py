"""The piece pool: a SQLite index over content-addressed safetensors blobs in one directory.

A blob lives at blobs/<first 2 hex>/<piece_id>.safetensors and is renamed into place before its index
row is committed, so the index never names a blob that is not whole; a crash in between leaves at
most an orphan blob, which `verify` reports. Every write is a single autocommitted statement in WAL
mode (a withdrawal: one transaction), taken under an fcntl lock on <pool>/.lock so that a blob and its
row come and go together, so several processes (and threads) can share one pool directory: two
`flwr run`s that overlap, or a withdrawal during a round.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import numpy as np
from safetensors import safe_open

from coordinator.validation import PieceRejected, RegisteredSeed, ValidationPolicy, validate
from protocols.files import write_atomic
from protocols.piece_bounds import PieceBounds, nonfinite_problem, size_problem
from protocols.pieces import Piece, PieceFormatError, lora_delta_norm

BUSY_TIMEOUT_S = 30.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS seeds (
    seed_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, shapes TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pieces (
    piece_id TEXT PRIMARY KEY, seed_id TEXT NOT NULL, position TEXT NOT NULL, rank INTEGER NOT NULL,
    alpha REAL NOT NULL, contributor TEXT NOT NULL, d_in INTEGER NOT NULL, d_out INTEGER NOT NULL,
    dtype TEXT NOT NULL, delta_norm REAL NOT NULL, created REAL NOT NULL, nbytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS pieces_seed_position ON pieces (seed_id, position);
CREATE TABLE IF NOT EXISTS withdrawals (
    request_id TEXT PRIMARY KEY, contributor TEXT NOT NULL, applied REAL NOT NULL, pieces TEXT NOT NULL);
"""


class PiecePool:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "index.sqlite", timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._setup()
        self._thread_lock = threading.Lock()
        self._lock_file = None  # <pool>/.lock, opened on the first write and held until close

    def _setup(self) -> None:
        """Switch to WAL and create the schema. Switching the journal mode does not wait on SQLite's
        busy handler, so processes that open a fresh pool together retry here until one has done it."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(SCHEMA)
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()

    @contextmanager
    def _writing(self):
        """One writer at a time across threads and processes (runs that overlap, a withdrawal): an fcntl lock
        on <pool>/.lock around each blob-and-row change, so that a blob and its row come and go together."""
        with self._thread_lock:
            if self._lock_file is None:
                self._lock_file = open(self.root / ".lock", "a+b")  # noqa: SIM115
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)

    def __enter__(self) -> "PiecePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # seeds

    def register_seed(self, seed: RegisteredSeed) -> None:
        """Record a seed and its LoRA target shapes; a seed id is bound to one content hash forever."""
        shapes = json.dumps({pos: list(dims) for pos, dims in sorted(seed.shapes.items())})
        self._db.execute("INSERT OR IGNORE INTO seeds VALUES (?, ?, ?)", (seed.seed_id, seed.content_hash, shapes))
        known = self.seed(seed.seed_id)
        if known.content_hash != seed.content_hash:
            raise ValueError(f"seed {seed.seed_id!r} is already registered with content hash "
                             f"{known.content_hash}, not {seed.content_hash}; register changed weights "
                             f"under a new seed id")

    def seeds(self) -> list[RegisteredSeed]:
        rows = self._db.execute("SELECT seed_id, content_hash, shapes FROM seeds ORDER BY seed_id").fetchall()
        return [_seed_from_row(row) for row in rows]

    def seed(self, seed_id: str) -> RegisteredSeed:
        found = self._find_seed(seed_id)
        if found is None:
            raise KeyError(f"seed {seed_id!r} is not registered with the pool at {self.root}")
        return found

    def _find_seed(self, seed_id: str) -> RegisteredSeed | None:
        row = self._db.execute("SELECT seed_id, content_hash, shapes FROM seeds WHERE seed_id = ?",
                               (seed_id,)).fetchone()
        return None if row is None else _seed_from_row(row)

    # pieces

    def add(self, piece: Piece, policy: ValidationPolicy | None = None) -> str:
        """Validate and store one piece; returns its id. Raises PieceRejected and stores nothing on failure."""
        validate(piece, self._find_seed(piece.seed_id), policy)
        pid = piece.piece_id
        data = piece.to_bytes()
        with self._writing():
            if self._db.execute("SELECT 1 FROM pieces WHERE piece_id = ?", (pid,)).fetchone():
                return pid
            quota = policy.contributor_quota if policy else None
            held = self._db.execute("SELECT COUNT(*) FROM pieces WHERE contributor = ?",
                                    (piece.contributor,)).fetchone()[0]
            if quota is not None and held >= quota:
                raise PieceRejected(piece, "quota", f"contributor {piece.contributor} already holds {held} pieces "
                                                    f"in the pool, its quota")
            self._write_blob(pid, data)
            self._db.execute(
                "INSERT OR IGNORE INTO pieces VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pid, piece.seed_id, piece.position, int(piece.rank), float(piece.alpha), piece.contributor,
                 int(piece.A.shape[1]), int(piece.B.shape[0]), str(piece.A.dtype), lora_delta_norm(piece),
                 time.time(), len(data)))
        return pid

    def add_many(self, pieces: Iterable[Piece],
                 policy: ValidationPolicy | None = None) -> tuple[list[str], list[PieceRejected]]:
        """Store every piece that passes; a refused piece never blocks the others. A piece the disk or the index
        could not take (a full disk) is refused under check 'store': what is returned as accepted is stored."""
        accepted: list[str] = []
        rejected: list[PieceRejected] = []
        for piece in pieces:
            try:
                accepted.append(self.add(piece, policy))
            except PieceRejected as err:
                rejected.append(err)
            except (OSError, sqlite3.Error) as err:
                rejected.append(PieceRejected(piece, "store", f"the pool could not store it: {err}"))
        return accepted, rejected

    def gates(self, seed_id: str, rank: int | None = None,
              skipped: list[str] | None = None) -> list[tuple[str, str, int, np.ndarray]]:
        """(piece_id, position, rank, gate) for every piece of a seed, reading only the gate tensor. With a
        `skipped` list, a missing or unreadable blob is left out and described there instead of raising."""
        sql = "SELECT piece_id, position, rank FROM pieces WHERE seed_id = ?"
        args: tuple = (seed_id,)
        if rank is not None:
            sql += " AND rank = ?"
            args += (int(rank),)
        rows = self._db.execute(sql + " ORDER BY position, piece_id", args).fetchall()
        out = []
        for pid, position, r in rows:
            try:
                with safe_open(self._blob_path(pid), framework="np") as fh:
                    out.append((pid, position, r, fh.get_tensor("gate")))
            except Exception as err:  # safetensors raises several types on a missing or corrupt file
                if skipped is None:
                    raise
                skipped.append(f"piece {pid}: gate unreadable, skipped: {err}")
        return out

    def get(self, piece_ids: Iterable[str], skipped: list[str] | None = None) -> list[Piece]:
        """The pieces, read from their blobs. With a `skipped` list, a missing or corrupt blob (one that does not
        decode or whose content is not its id) is left out and described there instead of raising."""
        pieces = []
        for pid in piece_ids:
            if not self._db.execute("SELECT 1 FROM pieces WHERE piece_id = ?", (pid,)).fetchone():
                if skipped is None:
                    raise KeyError(f"piece {pid!r} is not in the pool at {self.root}")
                skipped.append(f"piece {pid}: no longer in the pool (withdrawn since it was served), skipped")
                continue
            try:
                piece = Piece.from_bytes(self._blob_path(pid).read_bytes())
                if piece.piece_id != pid:
                    raise PieceFormatError(f"the blob's content hashes to {piece.piece_id[:12]}…")
            except (OSError, PieceFormatError) as err:
                if skipped is None:
                    raise
                skipped.append(f"piece {pid}: blob unreadable, skipped: {err}")
                continue
            pieces.append(piece)
        return pieces

    def positions(self, seed_id: str) -> list[str]:
        rows = self._db.execute("SELECT DISTINCT position FROM pieces WHERE seed_id = ? ORDER BY position",
                                (seed_id,)).fetchall()
        return [row[0] for row in rows]

    def count(self, seed_id: str | None = None) -> int:
        if seed_id is None:
            return self._db.execute("SELECT COUNT(*) FROM pieces").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM pieces WHERE seed_id = ?", (seed_id,)).fetchone()[0]

    def contributors(self, seed_id: str | None = None) -> dict[str, int]:
        """Pieces per contributor key id."""
        sql, args = "SELECT contributor, COUNT(*) FROM pieces", ()
        if seed_id is not None:
            sql, args = sql + " WHERE seed_id = ?", (seed_id,)
        return dict(self._db.execute(sql + " GROUP BY contributor ORDER BY contributor", args).fetchall())

    def withdraw(self, contributor: str, request_id: str) -> tuple[list[str], bool]:
        """Remove every piece of `contributor` (index rows in one transaction, then their blobs) for the
        withdrawal request `request_id`; returns (piece ids removed, whether the request was new). A request
        applies once: replayed later, it removes nothing, so pieces shared after a withdrawal stay."""
        with self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._db.execute("SELECT 1 FROM withdrawals WHERE request_id = ?", (request_id,)).fetchone():
                    self._db.execute("ROLLBACK")
                    return [], False
                ids = [row[0] for row in self._db.execute(
                    "SELECT piece_id FROM pieces WHERE contributor = ? ORDER BY piece_id", (contributor,))]
                self._db.execute("DELETE FROM pieces WHERE contributor = ?", (contributor,))
                self._db.execute("INSERT INTO withdrawals VALUES (?, ?, ?, ?)",
                                 (request_id, contributor, time.time(), json.dumps(ids)))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            for pid in ids:  # after the commit: the index never names a missing blob
                self._blob_path(pid).unlink(missing_ok=True)
        return ids, True

    def withdrawals(self) -> list[dict]:
        rows = self._db.execute("SELECT request_id, contributor, applied, pieces FROM withdrawals ORDER BY applied")
        return [{"request": r, "contributor": c, "applied": a, "pieces": json.loads(p)} for r, c, a, p in rows]

    def bytes_stored(self) -> int:
        return self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM pieces").fetchone()[0]

    def verify(self, bounds: PieceBounds = PieceBounds()) -> list[str]:
        """Re-read every blob and check it against its id, its index row (seed, position, rank, contributor), its
        signature, its seed, finiteness and bounds; one problem per bad piece, plus a line for orphan blobs (no
        index row) and one for temp files left by a crash. The files are listed under the writers' lock, so a
        live writer's blob between its rename and its row, or its temp file, is never taken for either.
        An empty list means all good."""
        with self._writing():
            rows = {row[0]: tuple(row[1:]) for row in self._db.execute(
                "SELECT piece_id, seed_id, position, rank, contributor FROM pieces ORDER BY piece_id")}
            blobs = list(self.blobs.glob("*/*.safetensors"))
            temps = self._temp_files()
        seeds = {s.seed_id: s.content_hash for s in self.seeds()}
        problems = [p for p in (self._verify_one(pid, row, seeds, bounds) for pid, row in rows.items()) if p]
        orphans = [f for f in blobs if f.stem not in rows]
        if orphans:
            problems.append(f"{len(orphans)} orphan blob(s) with no index row, e.g. {orphans[0]}")
        if temps:
            problems.append(f"{len(temps)} temp file(s) left by a crashed writer, e.g. {temps[0]}; "
                            f"`bouquet pool verify --repair` removes them")
        return problems

    def remove_leftovers(self) -> list[Path]:
        """Delete the temp files crashed writers left (under the writers' lock, so none is a live one's)."""
        with self._writing():
            temps = self._temp_files()
            for path in temps:
                path.unlink(missing_ok=True)
        return temps

    def _temp_files(self) -> list[Path]:
        return sorted(self.blobs.glob("*/.*.tmp"))

    def _verify_one(self, pid: str, row: tuple, seeds: dict[str, str], bounds: PieceBounds) -> str | None:
        path = self._blob_path(pid)
        try:
            piece = Piece.from_bytes(path.read_bytes())
        except FileNotFoundError:
            return f"piece {pid}: index row without a blob at {path}"
        except PieceFormatError as err:
            return f"piece {pid}: blob does not decode: {err}"
        if piece.piece_id != pid:
            return f"piece {pid}: blob content hashes to {piece.piece_id}, not its id"
        blob = (piece.seed_id, piece.position, piece.rank, piece.contributor)
        names = ("seed", "position", "rank", "contributor")
        differ = [f"{n} {b!r} (index: {i!r})" for n, b, i in zip(names, blob, row) if b != i]
        if differ:
            return f"piece {pid}: the blob disagrees with its index row: " + ", ".join(differ)
        if not piece.signature_ok():
            return f"piece {pid}: signature does not verify"
        if seeds.get(piece.seed_id) != piece.seed_hash:
            return f"piece {pid}: seed {piece.seed_id!r} with hash {piece.seed_hash[:12]}… is not registered"
        numbers = nonfinite_problem({"A": piece.A, "B": piece.B, "gate": piece.gate}) or size_problem(
            piece.A, piece.B, piece.alpha, piece.rank, piece.gate, bounds)
        if numbers:
            return f"piece {pid}: {numbers}"
        return None

    def _blob_path(self, piece_id: str) -> Path:
        return self.blobs / piece_id[:2] / f"{piece_id}.safetensors"

    def _write_blob(self, piece_id: str, data: bytes) -> None:
        """Write to a temp file beside the target and rename it into place: readers never see half a blob."""
        target = self._blob_path(piece_id)
        target.parent.mkdir(exist_ok=True)
        write_atomic(target, data)


def _seed_from_row(row: tuple[str, str, str]) -> RegisteredSeed:
    seed_id, content_hash, shapes = row
    return RegisteredSeed(seed_id, content_hash, {pos: tuple(dims) for pos, dims in json.loads(shapes).items()})
