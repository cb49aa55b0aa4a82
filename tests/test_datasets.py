"""Real data sets turned into users: the right users, disjoint history and test, the same split every time."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
from conftest import REAL_STYLEQA, needs_real_styleqa

from protocols.records import DataFormatError, PersonalRecord, load_records
from simulation.datasets import (
    HEALTHTWEETS_PROMPT,
    UserData,
    load_users,
    shorten_urls,
    tweet_record,
    tweets_by_account,
    write_user_files,
)
from simulation.styleqa import find_styleqa

ACCOUNTS = [
    "bbchealth", "cbchealth", "cnnhealth", "everydayhealth", "foxnewshealth", "gdnhealthcare", "goodhealth",
    "KaiserHealthNews", "latimeshealth", "msnhealthnews", "NBChealth", "nprhealth", "nytimeshealth",
    "reuters_health", "usnewshealth", "wsjhealth",
]  # fmt: skip


def ids(records: list[PersonalRecord]) -> set[str]:
    return {r.id for r in records}


# --- healthtweets ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tweets() -> list[UserData]:
    return load_users("healthtweets", history_size=8, test_size=4, seed=3)


def test_shorten_urls_keeps_scheme_host_and_surrounding_punctuation():
    assert shorten_urls("Ebola spreads http://bbc.in/1CimpJF") == "Ebola spreads http://bbc.in"
    assert shorten_urls("On Facebook (http://ow.ly/jDU3l) today") == "On Facebook (http://ow.ly) today"
    assert shorten_urls("see https://www.cbc.ca/news/x-1.2?cmp=rss. Now") == "see https://www.cbc.ca. Now"
    assert shorten_urls("no link here") == "no link here"


def test_tweet_record_builds_a_plain_prompt_and_a_styled_answer():
    text = "How to make  time for your #health: http://www.cnn.com/2014/03/21/fit/index.html @CNNFitNation"
    record = tweet_record("cnnhealth", "cnnhealth-1", text)
    assert record == PersonalRecord(
        user="cnnhealth",
        input=HEALTHTWEETS_PROMPT + "how to make time for your health: cnnfitnation",
        output="How to make time for your #health: http://www.cnn.com @CNNFitNation",
        id="cnnhealth-1",
    )
    trailing = tweet_record("goodhealth", "goodhealth-2", "19 signs your thyroid is out of whack: http://ow.ly/ED9zt")
    assert trailing is not None and trailing.input == HEALTHTWEETS_PROMPT + "19 signs your thyroid is out of whack"
    entity = tweet_record("a", "a-3", "Q&amp;A on sleep and stress http://nyti.ms/x")
    assert entity is not None and entity.output == "Q&A on sleep and stress http://nyti.ms"


def test_tweet_record_drops_retweets_and_short_tweets():
    assert tweet_record("a", "a-1", "RT @someone: a long enough retweet about flu shots http://t.co/x") is None
    assert tweet_record("a", "a-2", "@someone Great, thanks! http://bit.ly/x") is None
    assert tweet_record("a", "a-3", "Flu shots work for most http://bit.ly/x") is not None


def test_tweets_by_account_filters_and_orders_accounts():
    rows = [
        ("zeta-1", "Flu season starts early this year http://bbc.in/a"),
        ("Alpha-2", "Walking daily lowers blood pressure http://n.pr/b"),
        ("zeta-3", "Flu season starts early this year http://bbc.in/c"),  # same output once shortened
        ("zeta-4", "RT @x: Flu season starts early this year http://bbc.in/d"),
        ("zeta-5", "Thanks, great chat! http://bbc.in/e"),
        ("zeta-6", "New study on sleep and memory http://bbc.in/f"),
    ]
    accounts = tweets_by_account(rows)
    assert list(accounts) == ["Alpha", "zeta"]
    assert [r.id for r in accounts["zeta"]] == ["zeta-1", "zeta-6"]


def test_healthtweets_gives_the_16_accounts_in_name_order(tweets):
    assert [u.user for u in tweets] == ACCOUNTS
    for user in tweets:
        assert (len(user.history), len(user.test)) == (8, 4)
        assert {r.user for r in user.history + user.test} == {user.user}
        assert all(r.id.startswith(user.user + "-") for r in user.history + user.test)
        assert all(r.input.startswith(HEALTHTWEETS_PROMPT) for r in user.history + user.test)
        assert not any(re.search(r"https?://\S*/", r.output) for r in user.history + user.test)
        assert not any(r.output.startswith("RT ") for r in user.history + user.test)


def test_healthtweets_history_and_test_are_disjoint_and_seeded(tweets):
    for user in tweets:
        assert len(ids(user.history) | ids(user.test)) == 12
        assert len({r.output for r in user.history + user.test}) == 12
    again = load_users("healthtweets", history_size=8, test_size=4, seed=3, max_users=2)
    assert again == tweets[:2]
    other = load_users("healthtweets", history_size=8, test_size=4, seed=4, max_users=2)
    assert [ids(u.history) for u in other] != [ids(u.history) for u in tweets[:2]]


# --- styleqa ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def styleqa(styleqa_folder) -> list[UserData]:
    return load_users(str(styleqa_folder), history_size=10, test_size=5, styleqa_users_per_style=3, seed=1)


@functools.cache
def raw_rows(folder: Path, style: int, split: str) -> list[dict]:
    with (folder / f"{style}_{split}.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_styleqa_gives_users_per_style_in_style_order(styleqa):
    assert [u.user for u in styleqa] == [f"style{s}-u{j}" for s in range(9) for j in range(3)]
    for user in styleqa:
        style = user.user.removeprefix("style").split("-")[0]
        assert (len(user.history), len(user.test)) == (10, 5)
        assert all(r.id.startswith(f"{style}-train-") for r in user.history)
        assert all(r.id.startswith(f"{style}-test-") for r in user.test)
        assert {r.user for r in user.history + user.test} == {user.user}


def test_styleqa_users_of_a_style_get_disjoint_slices(styleqa):
    for style in range(9):
        users = [u for u in styleqa if u.user.startswith(f"style{style}-")]
        assert len(set().union(*(ids(u.history) for u in users))) == 30
        assert len(set().union(*(ids(u.test) for u in users))) == 15


def test_styleqa_styles_share_row_indices_and_records_match_the_files(styleqa, styleqa_folder):
    by_name = {u.user: u for u in styleqa}
    rows = [r.id.split("-")[-1] for r in by_name["style1-u0"].history]
    assert [r.id.split("-")[-1] for r in by_name["style5-u0"].history] == rows
    # styles 1-8 share their training questions, so the same rows are the same questions
    assert [r.input for r in by_name["style1-u0"].history] == [r.input for r in by_name["style5-u0"].history]
    for record in by_name["style5-u0"].history + by_name["style5-u0"].test:
        style, split, row = record.id.split("-")
        raw = raw_rows(styleqa_folder, int(style), split)[int(row)]
        expected = raw["Context"] + (f"\n\n{raw['Input']}" if raw["Input"] else "")
        assert (record.input, record.output) == (expected, raw["Response"])
    assert any("\n\n" in r.input for r in by_name["style5-u0"].history)  # rows with an Input were seen


def test_styleqa_accepts_a_folder_and_refuses_too_many_users(styleqa_found):
    assert load_users(str(styleqa_found), history_size=2, test_size=1, max_users=3) == load_users(
        "styleqa", history_size=2, test_size=1, max_users=3
    )
    with pytest.raises(ValueError, match="lower history_size"):
        load_users("styleqa", history_size=400, test_size=1, styleqa_users_per_style=3)


@needs_real_styleqa
def test_the_real_styleqa_has_nine_styles_of_1000_rows_on_shared_questions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no shared/ above: found from the code's own place, next to the checkout
    assert find_styleqa() == REAL_STYLEQA
    questions = {}
    for style in range(9):
        for split in ("train", "test"):
            rows = raw_rows(REAL_STYLEQA, style, split)
            assert len(rows) == 1000 and all(set(row) == {"Context", "Input", "Response"} for row in rows)
            assert all(row["Response"].strip() for row in rows)
            questions[style, split] = [(row["Context"], row["Input"]) for row in rows]
    for style in range(1, 9):  # styles 1-8 answer the same questions; style 0 has train and test swapped
        assert questions[style, "train"] == questions[1, "train"] == questions[0, "test"]
        assert questions[style, "test"] == questions[1, "test"] == questions[0, "train"]
    users = load_users("styleqa", history_size=500, test_size=500, styleqa_users_per_style=2)
    assert len(users) == 18 and all(len(ids(u.history)) == len(ids(u.test)) == 500 for u in users)
    with pytest.raises(ValueError, match="lower history_size"):
        load_users("styleqa", history_size=334, test_size=1, styleqa_users_per_style=3)


# --- personal-data JSONL ---------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def personal_file(tmp_path: Path) -> Path:
    rows = [{"user": "alice", "input": f"q{t}", "output": f"a{t}", "time": str(t)} for t in (30, 4, 100, 25, 7)]
    rows += [{"user": "carol", "input": f"q{i}", "output": f"c{i}"} for i in range(4)]
    rows += [{"user": "bob", "input": "q", "output": "b"}] * 2
    return write_jsonl(tmp_path / "people.jsonl", rows)


def test_jsonl_splits_by_time_else_file_order_and_drops_small_users(personal_file):
    alice, carol = load_users(str(personal_file), history_size=2, test_size=2)
    assert [r.output for r in alice.history] == ["a7", "a25"]
    assert [r.output for r in alice.test] == ["a30", "a100"]  # numeric times: 100 is the latest
    assert [r.output for r in carol.history] == ["c0", "c1"]
    assert [r.output for r in carol.test] == ["c2", "c3"]
    assert [u.user for u in load_users(str(personal_file), history_size=2, test_size=2, max_users=1)] == ["alice"]


def test_too_few_items_says_what_the_largest_user_has(personal_file):
    with pytest.raises(ValueError, match=r"largest has 5.*lower history_size or test_size"):
        load_users(str(personal_file), history_size=4, test_size=2)


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"user": "a", "input": "q", "output": "x"}\n{"user": "a", "input": "q"\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: not valid JSON"):
        load_users(str(path), history_size=1, test_size=1)


def test_unknown_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="healthtweets"):
        load_users(str(tmp_path / "nowhere.jsonl"), history_size=1, test_size=1)


def test_write_user_files_round_trips(personal_file, tmp_path):
    alice = load_users(str(personal_file), history_size=2, test_size=2)[0]
    write_user_files(alice, tmp_path / "alice")
    assert load_records(tmp_path / "alice" / "history.jsonl") == alice.history
    assert load_records(tmp_path / "alice" / "test.jsonl") == alice.test


def test_user_names_become_one_safe_folder_name():
    from simulation.user_data import folder_name

    assert folder_name("bbchealth") == "bbchealth" and folder_name("style0-u1") == "style0-u1"
    names = ["hamlet/Ham", "hamlet_Ham", "../escape", "..", "a b\\c", ""]
    folders = [folder_name(n) for n in names]
    assert len(set(folders)) == len(names)  # no two names share a folder
    for f in folders:
        assert f and "/" not in f and "\\" not in f and not f.startswith(".")
