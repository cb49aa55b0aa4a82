"""The piece pool: a SQLite index over content-addressed safetensors blobs in one directory.

A blob lives at blobs/<first 2 hex>/<piece_id>.safetensors and is renamed into place before its index
row is committed, so the index never names a blob that is not whole; a crash in between leaves at
most an orphan blob, which `verify` reports. Every write is a single autocommitted statement in WAL
mode, so several processes (and threads) can share one pool directory.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np
from safetensors import safe_open

from coordinator.validation import PieceRejected, RegisteredSeed, ValidationPolicy, validate
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
        if self._db.execute("SELECT 1 FROM pieces WHERE piece_id = ?", (pid,)).fetchone():
            return pid
        data = piece.to_bytes()
        self._write_blob(pid, data)
        self._db.execute(
            "INSERT OR IGNORE INTO pieces VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (pid, piece.seed_id, piece.position, int(piece.rank), float(piece.alpha), piece.contributor,
             int(piece.A.shape[1]), int(piece.B.shape[0]), str(piece.A.dtype), lora_delta_norm(piece),
             time.time(), len(data)))
        return pid

    def add_many(self, pieces: Iterable[Piece],
                 policy: ValidationPolicy | None = None) -> tuple[list[str], list[PieceRejected]]:
        """Store every piece that passes; a refused piece never blocks the others."""
        accepted: list[str] = []
        rejected: list[PieceRejected] = []
        for piece in pieces:
            try:
                accepted.append(self.add(piece, policy))
            except PieceRejected as err:
                rejected.append(err)
        return accepted, rejected

    def gates(self, seed_id: str, rank: int | None = None) -> list[tuple[str, str, int, np.ndarray]]:
        """(piece_id, position, rank, gate) for every piece of a seed, reading only the gate tensor."""
        sql = "SELECT piece_id, position, rank FROM pieces WHERE seed_id = ?"
        args: tuple = (seed_id,)
        if rank is not None:
            sql += " AND rank = ?"
            args += (int(rank),)
        rows = self._db.execute(sql + " ORDER BY position, piece_id", args).fetchall()
        out = []
        for pid, position, r in rows:
            with safe_open(self._blob_path(pid), framework="np") as fh:
                out.append((pid, position, r, fh.get_tensor("gate")))
        return out

    def get(self, piece_ids: Iterable[str]) -> list[Piece]:
        pieces = []
        for pid in piece_ids:
            if not self._db.execute("SELECT 1 FROM pieces WHERE piece_id = ?", (pid,)).fetchone():
                raise KeyError(f"piece {pid!r} is not in the pool at {self.root}")
            pieces.append(Piece.from_bytes(self._blob_path(pid).read_bytes()))
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

    def bytes_stored(self) -> int:
        return self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM pieces").fetchone()[0]

    def verify(self) -> list[str]:
        """Re-read every blob and check it against its id, signature and seed; one problem per bad piece,
        plus one line counting orphan blobs (blobs with no index row). An empty list means all good."""
        seeds = {s.seed_id: s.content_hash for s in self.seeds()}
        ids = [row[0] for row in self._db.execute("SELECT piece_id FROM pieces ORDER BY piece_id")]
        problems = [p for p in (self._verify_one(pid, seeds) for pid in ids) if p]
        known = set(ids)
        orphans = [f for f in self.blobs.glob("*/*.safetensors") if f.stem not in known]
        if orphans:
            problems.append(f"{len(orphans)} orphan blob(s) with no index row, e.g. {orphans[0]}")
        return problems

    def _verify_one(self, pid: str, seeds: dict[str, str]) -> str | None:
        path = self._blob_path(pid)
        try:
            piece = Piece.from_bytes(path.read_bytes())
        except FileNotFoundError:
            return f"piece {pid}: index row without a blob at {path}"
        except PieceFormatError as err:
            return f"piece {pid}: blob does not decode: {err}"
        if piece.piece_id != pid:
            return f"piece {pid}: blob content hashes to {piece.piece_id}, not its id"
        if not piece.signature_ok():
            return f"piece {pid}: signature does not verify"
        if seeds.get(piece.seed_id) != piece.seed_hash:
            return f"piece {pid}: seed {piece.seed_id!r} with hash {piece.seed_hash[:12]}… is not registered"
        return None

    def _blob_path(self, piece_id: str) -> Path:
        return self.blobs / piece_id[:2] / f"{piece_id}.safetensors"

    def _write_blob(self, piece_id: str, data: bytes) -> None:
        """Write to a temp file beside the target and rename it into place: readers never see half a blob."""
        target = self._blob_path(piece_id)
        target.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{piece_id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _seed_from_row(row: tuple[str, str, str]) -> RegisteredSeed:
    seed_id, content_hash, shapes = row
    return RegisteredSeed(seed_id, content_hash, {pos: tuple(dims) for pos, dims in json.loads(shapes).items()})
