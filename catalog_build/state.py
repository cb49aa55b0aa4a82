"""Where a build stands: its settings in build.json (refusing to mix seeds built two ways in one folder), and
each seed's state on disk, so that a rerun with the same settings resumes it.

Changing the probes or the answer length re-answers the seeds, never retrains them; changing the explanation
settings only re-explains them; anything else about the seeds is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from catalog_build.answers import kept_answers, stored_answers
from catalog_build.layout import ANSWERS_FILE, BUILD_FILE
from catalog_build.settings import SeedJob
from participants.progress import log
from protocols.catalog import CATALOG_FILE, SEEDS_DIR, load_catalog
from protocols.files import write_json
from protocols.seeds import SEED_FILE, materialize, read_seed_file

_EXPLAIN_KEYS = frozenset({"explain", "words", "basis"})  # "words"/"basis": build.json of earlier versions
_ANSWER_KEYS = frozenset({"probes", "max_new_tokens"})  # changing these re-answers the seeds, never retrains them


def check_settings(out: Path, settings: dict, explain: dict) -> None:
    """Refuse to add seeds built otherwise to a build folder; record the settings of a new one. The
    explanation settings are recorded too, but may change: they only re-explain the seeds."""
    path = out / BUILD_FILE
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they read back
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is damaged ({err}); build into another --out folder") from None
        if any(before.get(k) != settings.get(k) for k in _ANSWER_KEYS):
            log.info("probes or answer length changed: the seeds are answered again (answers to probes they already "
                     "answered at this length are kept), not retrained")
        before = {k: v for k, v in before.items() if k not in _EXPLAIN_KEYS | _ANSWER_KEYS}
        changed = sorted(k for k in settings.keys() | before.keys()
                         if k not in _ANSWER_KEYS and settings.get(k) != before.get(k))
        if changed:
            raise ValueError(f"the catalog at {out} was built with other settings ({', '.join(changed)} differ: "
                             f"{_difference(before, settings, changed[0])}); rerun with the same settings to "
                             f"resume it, or build into another --out folder")
    elif (out / CATALOG_FILE).is_file() or (out / SEEDS_DIR).is_dir():
        raise ValueError(f"{out} holds seeds or a catalog.json without the {BUILD_FILE} that `bouquet seeds build` "
                         f"writes; build into another --out folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings | {"explain": explain})


def _difference(before: dict, now: dict, key: str) -> str:
    def short(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "…"

    return f"{key} was {short(before.get(key))}, now {short(now.get(key))}"


def known_hashes(out: Path) -> dict[str, str]:
    """Seed name -> content hash from an earlier catalog.json, whose probe answers can be trusted for it."""
    try:
        return {e.name: e.content_hash for e in load_catalog(out).entries}
    except (FileNotFoundError, ValueError):
        return {}


def seed_state(folder: Path, job: SeedJob, probes: list[str], max_new_tokens: int, known: dict[str, str]) -> str:
    """"done" (folder intact and its probe answers stored), "answer" (delta on disk, answers missing or stale)
    or "build"."""
    if not (folder / SEED_FILE).is_file():
        return "build"
    meta = read_seed_file(folder)
    if meta.get("fingerprint") != job.fingerprint:
        raise ValueError(f"seed {job.name!r} in {folder.parent.parent} was built from other data "
                         f"({meta.get('built_from')}; now: {job.built_from}); build into another --out folder")
    try:
        content_hash = materialize(str(folder.resolve())).content_hash
    except ValueError as err:
        log.warning("seed %s: rebuilding a damaged folder (%s)", job.name, err)
        return "build"
    stored = stored_answers(folder / ANSWERS_FILE)
    if stored.get("probes") == probes and kept_answers(stored, content_hash, max_new_tokens, known.get(job.name)):
        if "content_hash" not in stored or "max_new_tokens" not in stored:  # an earlier version's file: complete it
            write_json(folder / ANSWERS_FILE, stored | {"content_hash": content_hash, "max_new_tokens": max_new_tokens})
        return "done"
    return "answer"
