import json

import pytest

from protocols.records import DataFormatError, PersonalRecord, group_by_user, load_records, save_records


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_round_trip_keeps_optional_fields(tmp_path):
    recs = [PersonalRecord("a", "q1", "r1", id="1", time="2024-01-01"), PersonalRecord("b", "q2", "r2")]
    save_records(recs, tmp_path / "d.jsonl")
    assert load_records(tmp_path / "d.jsonl") == recs
    assert list(group_by_user(recs)) == ["a", "b"]


@pytest.mark.parametrize("line, reason", [
    ('{"user": "a", "input": "q"}', "missing required key 'output'"),
    ('{"user": "a", "input": "q", "output": 3}', "'output' must be a string"),
    ('{"user": "a", "input": "q", "output": "r", "extra": 1}', "unknown keys ['extra']"),
    ('{"user": "a", "input": "q", "output": "  "}', "'output' is empty"),
    ('[1, 2]', "expected a JSON object"),
    ('{"user": "a", "input": "q", "output": "r"', "not valid JSON"),
])
def test_malformed_line_is_named_with_its_reason(tmp_path, line, reason):
    good = json.dumps({"user": "a", "input": "q", "output": "r"})
    path = write(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(DataFormatError) as err:
        load_records(path)
    assert "bad.jsonl:3:" in str(err.value) and reason in str(err.value)


def test_empty_and_missing_files_are_refused(tmp_path):
    with pytest.raises(DataFormatError, match="no records"):
        load_records(write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(DataFormatError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")


GOOD = '{"user": "a", "input": "q", "output": "r"}'


@pytest.mark.parametrize("raw, reason", [
    (b'{"user": "a", "input": "q", "output": "r\xff"}', "not UTF-8 (byte 0xff"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"user": "a", "input": "q", "output": "r", "id": 1e999}', "the number 1e999 overflows"),
    (b'{"user": "a", "input": "q", "output": "r", "id": ' + b"9" * 5000 + b"}", "a number of 5000 characters"),
    (b'{"user": "a", "input": "q", "output": "r\\ud800"}', "'output' holds a lone surrogate"),
    (b'{"user": "a", "input": "q", "output": "r", "id": NaN}', "NaN is not a number a record may hold"),
    (b'{"user": "a", "user": "b", "input": "q", "output": "r"}', "duplicate keys ['user']"),
    (b'{"user": "a", "input": "q", "output": "r", "id": "7"}', "duplicate id '7' of user 'a' (first at line 1)"),
])
def test_hostile_bytes_are_refused_with_file_line_and_reason(tmp_path, raw, reason):
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b'{"user": "a", "input": "q", "output": "r", "id": "7"}\n\n' + raw + b"\n")
    with pytest.raises(DataFormatError) as err:
        load_records(path)
    assert str(err.value).startswith(f"{path}:3: ") and reason in str(err.value)


def test_size_limits_are_configurable(tmp_path):
    from protocols.records import RecordLimits

    path = write(tmp_path / "big.jsonl", [GOOD, json.dumps({"user": "a", "input": "q", "output": "r" * 500})])
    assert len(load_records(path)) == 2
    with pytest.raises(DataFormatError, match=r"big.jsonl:2: the record is \d+ bytes, over the limit of 100"):
        load_records(path, RecordLimits(max_record_bytes=100))
    with pytest.raises(DataFormatError, match=r"big.jsonl: \d+ bytes, over the limit of 200"):
        load_records(path, RecordLimits(max_file_bytes=200))


def test_a_failed_save_leaves_nothing_half_written(tmp_path):
    path = tmp_path / "d.jsonl"
    save_records([PersonalRecord("a", "q", "r")], path)
    before = path.read_bytes()
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate cannot be written as UTF-8
        save_records([PersonalRecord("a", "q", "fine"), PersonalRecord("a", "q", "bad \ud800")], path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
