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
