"""Per-user streams in time order, each followed by its held-out items (the ones that come next).

    healthtweets  an account's tweets sorted by tweet id (Twitter's ids grow with time), the most recent
                  stream + test of them: the stream is the older part, the test the newer
    styleqa       users style{s}-u{j}: consecutive slices of style s's training rows in file order (the data has
                  no time; file order stands in for it), tested on its test rows
"""

from __future__ import annotations

from dataclasses import replace

from protocols.records import PersonalRecord
from simulation.datasets import _healthtweets_rows, tweets_by_account
from simulation.styleqa import STYLEQA_STYLES, find_styleqa, styleqa_rows
from simulation.user_data import UserData


def _tweet_time(rec: PersonalRecord) -> int:
    return int(rec.id.rsplit("-", 1)[-1])


def stream_users(data: str, stream: int, test: int, users: int) -> list[UserData]:
    """`users` users, each with `stream` items in time order (as UserData.history) and `test` held-out items."""
    if data == "healthtweets":
        found = []
        for name, records in tweets_by_account(_healthtweets_rows()).items():
            ordered = sorted(records, key=_tweet_time)
            if len(ordered) >= stream + test:
                window = ordered[-(stream + test):]
                found.append(UserData(name, window[:stream], window[stream:]))
    elif data == "styleqa":
        folder, found = find_styleqa(), []
        per_style = -(-users // len(STYLEQA_STYLES))
        for j in range(per_style):
            for s in STYLEQA_STYLES:
                train, held = styleqa_rows(folder, s, "train"), styleqa_rows(folder, s, "test")
                if (j + 1) * stream > len(train) or (j + 1) * test > len(held):
                    raise ValueError(f"styleqa style {s} has {len(train)} train and {len(held)} test rows, too few "
                                     f"for {per_style} users of {stream} + {test}")
                name = f"style{s}-u{j}"
                found.append(UserData(name, [replace(r, user=name) for r in train[j * stream:(j + 1) * stream]],
                                      [replace(r, user=name) for r in held[j * test:(j + 1) * test]]))
    else:
        raise ValueError(f"unknown data {data!r}: use 'healthtweets' or 'styleqa'")
    if len(found) < users:
        raise ValueError(f"{data} has {len(found)} users with {stream} + {test} items; {users} asked: lower --users, "
                         f"--stream or --test")
    return found[:users]
