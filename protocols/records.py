"""The personal-data format: JSON Lines, one record per line.

    {"user": "alice", "input": "…", "output": "…", "id": "optional", "time": "optional"}

`input` is what the user was asked or wrote to the assistant, `output` is the answer written
the way this user writes. The loader refuses a malformed file as a whole, naming the line and
the reason, so that nothing is trained on half a file. A device reads files it did not write, so the
loader reads bytes and refuses what a JSON parser would accept but nothing downstream should meet:
bytes that are not UTF-8, nesting, numbers too long to be an id or that overflow, NaN, lone surrogates,
duplicate keys or (user, id) pairs, and lines or files over the limits of `RecordLimits`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from protocols.files import write_atomic
from protocols.settings import setting

REQUIRED = ("user", "input", "output")
OPTIONAL = ("id", "time")


class DataFormatError(ValueError):
    """A personal-data file that does not follow the record format."""


@dataclass(frozen=True)
class RecordLimits:
    max_file_bytes: int = setting(256 * 2**20, "largest personal-data file the loader reads", low=1)
    max_record_bytes: int = setting(2**20, "largest line (one record) of a personal-data file", low=1)
    max_number_chars: int = setting(32, "longest number literal (an id or a time) in a record", low=1)


def _refuse(reason: str):
    """A parse hook that refuses what it is called on."""
    def hook(value):
        raise ValueError(reason.format(value=value))
    return hook


def _decode(line: str, limits: RecordLimits) -> object:
    """json.loads without NaN/Infinity, overlong or overflowing numbers, or duplicate keys."""
    def number(kind):
        def parse(text: str):
            if len(text) > limits.max_number_chars:
                raise ValueError(f"a number of {len(text)} characters (at most {limits.max_number_chars})")
            value = kind(text)
            if kind is float and value in (float("inf"), float("-inf")):
                raise ValueError(f"the number {text} overflows")
            return value
        return parse

    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
        return dict(items)

    return json.loads(line, parse_int=number(int), parse_float=number(float),
                      parse_constant=_refuse("{value} is not a number a record may hold"), object_pairs_hook=pairs)


@dataclass(frozen=True)
class PersonalRecord:
    user: str
    input: str
    output: str
    id: str | None = None
    time: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, ensure_ascii=False)


def parse_record(obj: object, where: str, require_output: bool = True) -> PersonalRecord:
    """One record from its parsed JSON; `require_output=False` lets an item of a device's stream come without an
    answer (its owner has not annotated it), as `output` ""."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if not require_output and obj.get("output", "") in ("", None):
        obj = {k: v for k, v in obj.items() if k != "output"} | {"output": ""}
    for key in REQUIRED:
        if key not in obj:
            raise DataFormatError(f"{where}: missing required key {key!r} (a record needs {', '.join(REQUIRED)})")
        if not isinstance(obj[key], str):
            raise DataFormatError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["user"].strip():
        raise DataFormatError(f"{where}: 'user' is empty")
    if require_output and not obj["output"].strip():
        raise DataFormatError(f"{where}: 'output' is empty; a record without an answer teaches nothing")
    if not require_output and not obj["input"].strip():
        raise DataFormatError(f"{where}: 'input' is empty; a stream item is scored and kept by its input")
    extra = {}
    for key in OPTIONAL:
        if key in obj and obj[key] is not None:
            if not isinstance(obj[key], (str, int, float)):
                raise DataFormatError(f"{where}: {key!r} must be a string or a number")
            extra[key] = str(obj[key])
    unknown = set(obj) - set(REQUIRED) - set(OPTIONAL)
    if unknown:
        raise DataFormatError(f"{where}: unknown keys {sorted(unknown)}; allowed are {REQUIRED + OPTIONAL}")
    for key, value in [(k, obj[k]) for k in REQUIRED] + list(extra.items()):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataFormatError(f"{where}: {key!r} holds a lone surrogate (an escape like \\ud800 that is "
                                  f"half of a character)") from None
    return PersonalRecord(user=obj["user"], input=obj["input"], output=obj["output"], **extra)


def load_records(path: str | Path, limits: RecordLimits = RecordLimits(),
                 require_output: bool = True) -> list[PersonalRecord]:
    """Read a personal-data JSONL file; raise DataFormatError naming the file, the first bad line and why.
    `require_output=False`: records may come without an answer (a device's stream, `bouquet device add`)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise DataFormatError(f"{path}: {size} bytes, over the limit of {limits.max_file_bytes}; split the file "
                              f"or raise max-file-bytes")
    records, seen = [], {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            if len(raw) > limits.max_record_bytes:
                raise DataFormatError(f"{where}: the record is {len(raw)} bytes, over the limit of "
                                      f"{limits.max_record_bytes}")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{where}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                                      f"convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = _decode(line, limits)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise DataFormatError(f"{where}: nested too deeply; a record is one flat JSON object") from None
            except ValueError as err:
                raise DataFormatError(f"{where}: {err}") from None
            rec = parse_record(obj, where, require_output)
            if rec.id is not None:
                first = seen.setdefault((rec.user, rec.id), lineno)
                if first != lineno:
                    raise DataFormatError(f"{where}: duplicate id {rec.id!r} of user {rec.user!r} (first at line "
                                          f"{first})")
            records.append(rec)
    if not records:
        raise DataFormatError(f"{path}: the file holds no records")
    return records


def save_records(records: Iterable[PersonalRecord], path: str | Path) -> None:
    """Write records as JSONL, atomically: a temp file beside the target, synced, then renamed into place; on
    any failure the temp file is removed and the target is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(rec.to_json() + "\n" for rec in records).encode("utf-8"))


def group_by_user(records: Iterable[PersonalRecord]) -> dict[str, list[PersonalRecord]]:
    """Records per user, in file order."""
    users: dict[str, list[PersonalRecord]] = defaultdict(list)
    for rec in records:
        users[rec.user].append(rec)
    return dict(users)
