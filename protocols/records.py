"""The personal-data format: JSON Lines, one record per line.

    {"user": "alice", "input": "…", "output": "…", "id": "optional", "time": "optional"}

`input` is what the user was asked or wrote to the assistant, `output` is the answer written
the way this user writes. The loader refuses a malformed file as a whole, naming the line and
the reason, so that nothing is trained on half a file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

REQUIRED = ("user", "input", "output")
OPTIONAL = ("id", "time")


class DataFormatError(ValueError):
    """A personal-data file that does not follow the record format."""


@dataclass(frozen=True)
class PersonalRecord:
    user: str
    input: str
    output: str
    id: str | None = None
    time: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, ensure_ascii=False)


def parse_record(obj: object, where: str) -> PersonalRecord:
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in REQUIRED:
        if key not in obj:
            raise DataFormatError(f"{where}: missing required key {key!r} (a record needs {', '.join(REQUIRED)})")
        if not isinstance(obj[key], str):
            raise DataFormatError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["user"].strip():
        raise DataFormatError(f"{where}: 'user' is empty")
    if not obj["output"].strip():
        raise DataFormatError(f"{where}: 'output' is empty; a record without an answer teaches nothing")
    extra = {}
    for key in OPTIONAL:
        if key in obj and obj[key] is not None:
            if not isinstance(obj[key], (str, int, float)):
                raise DataFormatError(f"{where}: {key!r} must be a string or a number")
            extra[key] = str(obj[key])
    unknown = set(obj) - set(REQUIRED) - set(OPTIONAL)
    if unknown:
        raise DataFormatError(f"{where}: unknown keys {sorted(unknown)}; allowed are {REQUIRED + OPTIONAL}")
    return PersonalRecord(user=obj["user"], input=obj["input"], output=obj["output"], **extra)


def load_records(path: str | Path) -> list[PersonalRecord]:
    """Read a personal-data JSONL file; raise DataFormatError naming the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            records.append(parse_record(obj, where))
    if not records:
        raise DataFormatError(f"{path}: the file holds no records")
    return records


def save_records(records: Iterable[PersonalRecord], path: str | Path) -> None:
    """Write records as JSONL, atomically (a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(rec.to_json() + "\n")
    tmp.replace(path)


def group_by_user(records: Iterable[PersonalRecord]) -> dict[str, list[PersonalRecord]]:
    """Records per user, in file order."""
    users: dict[str, list[PersonalRecord]] = defaultdict(list)
    for rec in records:
        users[rec.user].append(rec)
    return dict(users)
