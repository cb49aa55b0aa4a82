"""Every exchange between the coordinator and participants: message types and record keys.

Message types follow Flower's "<category>.<action>" rule. Pieces travel as an ArrayRecord of
float32/float16 tensors ("<i>.A", "<i>.B", "<i>.gate") plus one JSON metadata string per piece in a
ConfigRecord; the receiver rebuilds each piece and checks its signature over the same canonical
digest that the sender signed, so the container never has to be trusted. Arrays are decoded by
`decode_array`, which reads the .npy header itself and refuses one whose shape does not match the
bytes that came (np.load would first allocate whatever the header claims).

    STYLE          server -> participant the seed catalog (catalog.json)       (query.style)
                   participant -> server the seed it chose, the distance, the catalog's seeds nearest first,
                                         the reason in the catalog's attribute words; selection metrics
    PROFILE        server -> participant                                        (query.profile)
                   participant -> server history size + noised mean embedding + signing key id
    SHARE          server -> sharer     config: training settings              (train.share)
                   sharer -> server     pieces (signed with its key id) + metrics
    GATES          server -> newcomer   gates of the pool for one seed         (query.gates)
                   newcomer -> server   ids of the pieces it shortlisted + metrics
    ASSEMBLE       server -> newcomer   the shortlisted pieces + settings      (train.assemble)
                   newcomer -> server   metrics only (seed vs. assembled)
Replies never carry personal data: only pieces the sharer chose to share, piece ids, metrics. Nor do they carry
who a participant is: the coordinator knows a node by its node id and its signing key id, never by a user name,
a device path or a record's text, and an error reply names the exception's type or the limit that refused the
request, never its details (participants.error_replies).
"""

from __future__ import annotations

import io
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from numpy.lib import format as npy

from protocols.pieces import WIRE_DTYPES, Piece, PieceFormatError

STYLE = "query.style"
PROFILE = "query.profile"
SHARE = "train.share"
GATES = "query.gates"
ASSEMBLE = "train.assemble"

# record keys inside a message's RecordDict
CONFIG = "config"  # ConfigRecord of settings (server -> participant)
PIECES = "pieces"  # ArrayRecord of piece tensors
PIECE_META = "piece-meta"  # ConfigRecord: {"meta": [json, ...]}
GATE_ARRAYS = "gates"  # ArrayRecord: {piece_id: gate}
GATE_META = "gate-meta"  # ConfigRecord: {"ids": [...], "positions": [...], "ranks": [...]}
SHORTLIST = "shortlist"  # ConfigRecord: {"ids": [...]}
METRICS = "metrics"  # MetricRecord
CATALOG = "catalog"  # ConfigRecord: {"json": catalog.json's text}
SELECTION = "selection"  # ConfigRecord: {"seed": name or "" for the base, "distance", "reason", "ranking"}
PROFILE_RECORD = "profile"  # ConfigRecord: {"count": int, "embedding": [float, ...], "key-id": hex}
SEED = "seed"  # ConfigRecord: {"catalog-seed": name, "content-hash": hex}: the catalog seed a node runs on
#                (absent: the run's seed-model). A name and a hash, never a path of the coordinator's disk.


def pieces_to_records(pieces: list[Piece]) -> tuple[ArrayRecord, ConfigRecord]:
    arrays = {}
    for i, p in enumerate(pieces):
        for name in ("A", "B", "gate"):
            arr = np.ascontiguousarray(getattr(p, name))
            if arr.dtype not in (np.float32, np.float16):
                raise TypeError(f"piece {p.position}: {name} is {arr.dtype}; send float32 or float16")
            arrays[f"{i}.{name}"] = Array(arr)
    return ArrayRecord(arrays), ConfigRecord({"meta": [p.wire_meta() for p in pieces]})


def decode_array(arr: object, name: str) -> np.ndarray:
    """A float32/float16 numpy array from a Flower Array, or PieceFormatError saying why not. The header's
    shape must account for exactly the bytes that arrived, so nothing is allocated on a header's word."""
    if not isinstance(arr, Array) or arr.stype != "numpy.ndarray" or not isinstance(arr.data, bytes):
        raise PieceFormatError(f"{name} is not a numpy-serialized Array")
    fh = io.BytesIO(arr.data)
    try:
        read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(npy.read_magic(fh))
        if read is None:
            raise ValueError("an .npy version other than 1.0 or 2.0")
        shape, fortran, dtype = read(fh, max_header_size=1024)
    except (ValueError, SyntaxError, TypeError) as err:
        raise PieceFormatError(f"{name} has no readable .npy header: {err}") from None
    if dtype not in WIRE_DTYPES or fortran:
        raise PieceFormatError(f"{name} is {dtype}{' (Fortran order)' if fortran else ''}; send C-order float32 "
                               f"or float16")
    count = 1
    for dim in shape:
        count *= int(dim)
    body = len(arr.data) - fh.tell()
    if count * dtype.itemsize != body:
        raise PieceFormatError(f"{name}'s header claims shape {tuple(shape)} ({count * dtype.itemsize} bytes), "
                               f"but {body} bytes came")
    return np.frombuffer(arr.data, dtype=dtype, count=count, offset=fh.tell()).reshape(shape).copy()


def pieces_from_records(arrays: ArrayRecord, meta: ConfigRecord) -> list[Piece]:
    if not isinstance(arrays, ArrayRecord) or not isinstance(meta, ConfigRecord):
        raise PieceFormatError(f"pieces come as an ArrayRecord and a ConfigRecord, not a {type(arrays).__name__} "
                               f"and a {type(meta).__name__}")
    metas = meta["meta"] if "meta" in meta else []
    if isinstance(metas, str) or not isinstance(metas, list):
        raise PieceFormatError(f"the piece metadata is a {type(metas).__name__}, not a list of JSON strings")
    pieces = []
    for i, raw in enumerate(metas):
        try:
            fields = json.loads(raw)
            if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
                raise ValueError("the metadata is not an object of strings")
            tensors = {name: decode_array(arrays[f"{i}.{name}"], f"piece {i}'s {name}") for name in ("A", "B", "gate")}
        except (KeyError, TypeError, ValueError) as err:
            raise PieceFormatError(f"piece {i} of the message is incomplete: {err}") from None
        pieces.append(Piece.from_parts(fields, tensors))
    return pieces


def gates_to_records(entries: list[tuple[str, str, int, np.ndarray]]) -> tuple[ArrayRecord, ConfigRecord]:
    """entries: (piece_id, position, rank, gate)."""
    arrays = {pid: Array(np.ascontiguousarray(g, dtype=np.float32)) for pid, _, _, g in entries}
    meta = ConfigRecord({"ids": [e[0] for e in entries], "positions": [e[1] for e in entries],
                         "ranks": [int(e[2]) for e in entries]})
    return ArrayRecord(arrays), meta


def gates_from_records(arrays: ArrayRecord, meta: ConfigRecord) -> list[tuple[str, str, int, np.ndarray]]:
    if "ids" not in meta or not list(meta["ids"]):
        return []
    return [(pid, pos, int(rank), decode_array(arrays[pid], f"gate {pid}"))
            for pid, pos, rank in zip(meta["ids"], meta["positions"], meta["ranks"])]
