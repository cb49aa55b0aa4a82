"""styleqa's rules in one place: the XPerT style-QA folder, its users, and what a seed catalog makes of it.

The folder holds N_train.jsonl and N_test.jsonl for nine answer styles N = 0..8. Style 0 answers plainly (the
unstylized reference); styles 1–8 cross three attributes (elementary/expert, concise/informative,
friendly/neutral) and answer the same training questions. Users are named "style{s}-u{j}" and seeds
"style{s}"; `style_number` reads the style back from either.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from protocols.records import PersonalRecord
from simulation.user_data import UserData

STYLEQA_DIR = Path("shared") / "data" / "styleqa"
STYLEQA_STYLES = range(9)
STYLEQA_SEED_STYLES = range(1, 9)  # style 0 is the unstylized reference, not a style to offer
# The styles' attributes, as the data's README infers them (tone of 5 and 7 is also humorous).
STYLEQA_LABELS = {1: "elementary-concise-friendly", 2: "elementary-concise-neutral",
                  3: "elementary-informative-friendly", 4: "elementary-informative-neutral",
                  5: "expert-concise-friendly", 6: "expert-concise-neutral", 7: "expert-informative-friendly",
                  8: "expert-informative-neutral"}
_NAME = re.compile(r"^style(\d+)(?:-u\d+)?$")  # a seed "style3" or a user "style3-u0"


def style_number(name: str) -> int | None:
    """The style of a styleqa seed or user ("style3" or "style3-u0" -> 3); None for any other name."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def style_label(user: str) -> str:
    """A styleqa user's style class ("style{s}-u{j}" -> "style{s}"); any other user is its own class."""
    style = style_number(user)
    return f"style{style}" if style is not None else user


def find_styleqa() -> Path:
    """The shared styleqa folder, searched upward from the current directory and from this file."""
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in (start, *start.parents):
            if (folder / STYLEQA_DIR / "0_train.jsonl").is_file():
                return folder / STYLEQA_DIR
    raise FileNotFoundError(f"no {STYLEQA_DIR} above {' or '.join(map(str, starts))}: pass the folder's path")


def styleqa_rows(folder: Path, style: int, split: str) -> list[PersonalRecord]:
    path = folder / f"{style}_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a styleqa folder holds N_train.jsonl and N_test.jsonl, N = 0..8")
    records = []
    with path.open(encoding="utf-8") as fh:
        for row, obj in enumerate(json.loads(line) for line in fh if line.strip()):
            prompt = obj["Context"] + (f"\n\n{obj['Input']}" if obj["Input"].strip() else "")
            records.append(PersonalRecord(user="", input=prompt, output=obj["Response"], id=f"{style}-{split}-{row}"))
    return records


def styleqa_users(folder: Path, history_size: int, test_size: int, seed: int, per_style: int) -> list[UserData]:
    """Users f"style{s}-u{j}": disjoint slices of style s's rows, the same row indices in every style."""
    if per_style < 1:
        raise ValueError(f"styleqa_users_per_style must be at least 1, got {per_style}")
    styles = {s: (styleqa_rows(folder, s, "train"), styleqa_rows(folder, s, "test")) for s in STYLEQA_STYLES}
    n_train = min(len(train) for train, _ in styles.values())
    n_test = min(len(test) for _, test in styles.values())
    if per_style * history_size > n_train or per_style * test_size > n_test:
        raise ValueError(
            f"{per_style} users per style need {per_style * history_size} train and {per_style * test_size} test "
            f"rows, a style has {n_train} and {n_test}: lower history_size, test_size or styleqa_users_per_style"
        )
    rng = random.Random(seed)
    train_order = rng.sample(range(n_train), n_train)
    test_order = rng.sample(range(n_test), n_test)
    users = []
    for style, (train, test) in styles.items():
        for j in range(per_style):
            name = f"style{style}-u{j}"
            history = [replace(train[i], user=name) for i in train_order[j * history_size : (j + 1) * history_size]]
            held_out = [replace(test[i], user=name) for i in test_order[j * test_size : (j + 1) * test_size]]
            users.append(UserData(name, history, held_out))
    return users


# --- seeds ---------------------------------------------------------------------------------------------


def parse_styles(text: str) -> list[int]:
    """--styles "1,3,5" as style numbers; only styles 1..8 make seeds."""
    try:
        styles = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--styles takes comma-separated style numbers 1..8, got {text!r}") from None
    if not styles or any(s not in STYLEQA_SEED_STYLES for s in styles):
        raise ValueError(f"--styles takes style numbers 1..8 (0 is the unstylized reference), got {text!r}")
    return styles


def styleqa_groups(rows_per_style: int, styles: Iterable[int] = STYLEQA_SEED_STYLES,
                   folder: Path | None = None) -> dict[str, list[PersonalRecord]]:
    """{"style{s}": the first N training rows of style s}; all styles answer the same training questions."""
    folder = folder or find_styleqa()
    groups = {}
    for s in styles:
        rows = styleqa_rows(folder, s, "train")
        if not 1 <= rows_per_style <= len(rows):
            raise ValueError(f"--rows must be between 1 and {len(rows)} (style {s} has {len(rows)} training rows), "
                             f"got {rows_per_style}")
        groups[f"style{s}"] = [replace(r, user=f"style{s}") for r in rows[:rows_per_style]]
    return groups


def labeled_seeds(rows_per_style: int, styles: Sequence[int], folder: Path | None = None
                  ) -> tuple[dict[str, list[PersonalRecord]], dict[str, str], dict[str, str]]:
    """What the catalog build needs per seed "style{s}": its records, what it is built from, and its label in
    words (its three attributes)."""
    groups = styleqa_groups(rows_per_style, styles, folder)
    return groups, {f"style{s}": f"styleqa style {s}, {rows_per_style} rows" for s in styles}, \
        {f"style{s}": STYLEQA_LABELS[s] for s in styles}


def styleqa_probes(n: int, folder: Path | None = None, avoid: Iterable[str] = ()) -> list[str]:
    """The first n questions of style 1's test file that no style's training file holds (and not in `avoid`).

    Seeds and styleqa users of styles 1–8 draw from the training files, so these questions are never a
    seed's training input nor one of those users' history. (Style 0's training file holds these same
    questions: pass a style-0 user's history as `avoid` where that matters.)
    """
    folder = folder or find_styleqa()
    trained = {r.input for s in STYLEQA_SEED_STYLES for r in styleqa_rows(folder, s, "train")} | set(avoid)
    probes = [r.input for r in styleqa_rows(folder, 1, "test") if r.input not in trained]
    if not 1 <= n <= len(probes):
        raise ValueError(f"--probes must be between 1 and {len(probes)} (unused test questions), got {n}")
    return probes[:n]
