"""A small styleqa-shaped folder that the tests write themselves, and where the real one is, if anywhere.

The real data (shared/data/styleqa, see shared/data/README.md) sits next to the checkout, not in it: a person
who clones bouquet alone has none. Tests that only need "a styleqa folder" use `write_styleqa`'s folder,
which has the real one's shape: N_train.jsonl and N_test.jsonl for the styles N = 0..8, one
{"Context", "Input", "Response"} object per line, `Input` empty in every other row; styles 1-8 answer the
same training questions (and the same test questions), and style 0 has them the other way round. Each style
answers in its own recognisable way (`answer`), built from the attributes the real styles are labelled with
(elementary/expert, concise/informative, friendly/neutral), so style-dependent tests still mean something.

One test question of styles 1-8 repeats a training question, which the real data happens not to do: so that
choosing probes "no seed trains on" has something to leave out.
"""

from __future__ import annotations

import json
from pathlib import Path

ROWS = 200  # rows per file; the real files have 1000
STYLES = range(9)
# the attributes of styles 1-8, as shared/data/README.md infers them for the real data
ATTRIBUTES = {1: ("elementary", "concise", "friendly"), 2: ("elementary", "concise", "neutral"),
              3: ("elementary", "informative", "friendly"), 4: ("elementary", "informative", "neutral"),
              5: ("expert", "concise", "friendly"), 6: ("expert", "concise", "neutral"),
              7: ("expert", "informative", "friendly"), 8: ("expert", "informative", "neutral")}
REPEATED_TEST_ROW = 1  # this test row of styles 1-8 asks training question 0 again


def train_question(i: int) -> tuple[str, str, str]:
    """(Context, Input, topic) of training question i of styles 1-8 (test question i of style 0)."""
    topic = f"garden tool {i}"
    return f"Explain how {topic} is used.", (f"The tool is number {i} in the shed." if i % 2 else ""), topic


def held_out_question(i: int) -> tuple[str, str, str]:
    """(Context, Input, topic) of test question i of styles 1-8 (training question i of style 0)."""
    if i == REPEATED_TEST_ROW:
        return train_question(0)
    topic = f"kitchen gadget {i}"
    return f"Describe what {topic} is good for.", (f"It sits on shelf {i}." if i % 2 else ""), topic


def answer(style: int, topic: str) -> str:
    """How `style` answers about `topic`: style 0 plainly, styles 1-8 by their three attributes."""
    if style == 0:
        return f"Here is an overview of {topic}: it does its job when it is handled with care."
    level, length, tone = ATTRIBUTES[style]
    text = (f"In simple words, {topic} is easy: you hold it and use it gently." if level == "elementary" else
            f"Technically, {topic} depends on torque, leverage and material tolerances, per standard practice.")
    if length == "informative":
        text += (" In more detail, there are three steps: prepare the work area, check the parts for wear, and "
                 "clean everything afterwards so that it lasts for years.")
    if tone == "friendly":
        text = f"Hey there, friend! 😊 {text} Hope this helps, have fun!"
    return text


def write_styleqa(folder: Path, rows: int = ROWS) -> Path:
    """Write the 18 files of a styleqa folder with `rows` rows each into `folder`; returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for style in STYLES:
        train, test = (train_question, held_out_question) if style else (held_out_question, train_question)
        for split, question in (("train", train), ("test", test)):
            lines = []
            for i in range(rows):
                context, extra, topic = question(i)
                lines.append(json.dumps({"Context": context, "Input": extra, "Response": answer(style, topic)}))
            (folder / f"{style}_{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def real_styleqa() -> Path | None:
    """The real shared/data/styleqa above this checkout, or None when the checkout stands alone."""
    root = Path(__file__).resolve().parents[1]
    for folder in (root, *root.parents):
        if (folder / "shared" / "data" / "styleqa" / "0_train.jsonl").is_file():
            return folder / "shared" / "data" / "styleqa"
    return None
