"""The seed catalog's file: what the coordinator publishes and a device downloads to pick its seed.

    <catalog>/catalog.json        base, attribute basis, probe prompts, and one entry per seed with its
                                  explanation (coefficients over the attribute words, and the residual)
    <catalog>/seeds/<name>/       each seed as base + delta (protocols.seeds: seed.json and delta/)

A device needs only catalog.json to choose: the explanations, the basis that its own data is written in,
and the answer length the explanations were computed with. Its size grows by one short entry per seed,
and no seed's weights are read until one is chosen.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from protocols.explanations import AttributeBasis, Explanation

CATALOG_FILE = "catalog.json"
SEEDS_DIR = "seeds"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    content_hash: str
    explanation: Explanation
    built_from: str  # e.g. "styleqa style 3, 160 rows" or "pool cluster 2 of 4 (3 contributors)"
    delta_bytes: int

    def to_dict(self) -> dict:
        return {"name": self.name, "content_hash": self.content_hash, "explanation": self.explanation.to_dict(),
                "built_from": self.built_from, "delta_bytes": self.delta_bytes}

    @classmethod
    def from_dict(cls, obj: dict) -> CatalogEntry:
        return cls(str(obj["name"]), str(obj["content_hash"]), Explanation.from_dict(obj["explanation"]),
                   str(obj["built_from"]), int(obj["delta_bytes"]))


@dataclass
class Catalog:
    folder: Path
    base: str  # the base's seed source, e.g. "embedded:smollm2-135m-instruct"
    base_hash: str
    basis: AttributeBasis
    probes: list[str]
    max_new_tokens: int  # answer length of the probe answers (devices cut their own answers to it)
    entries: list[CatalogEntry] = field(default_factory=list)

    @property
    def words(self) -> tuple[str, ...]:
        return self.basis.words

    def seed_folder(self, name: str) -> Path:
        return self.folder / SEEDS_DIR / name

    def seed_source(self, name: str) -> str:
        """The seed source (absolute folder) that load_seed/materialize take."""
        if name not in {e.name for e in self.entries}:
            raise KeyError(f"no seed {name!r} in the catalog at {self.folder}; it has: "
                           f"{', '.join(e.name for e in self.entries) or 'none'}")
        return str(self.seed_folder(name).resolve())

    def explanations(self) -> dict[str, Explanation]:
        return {e.name: e.explanation for e in self.entries}

    def entry(self, name: str) -> CatalogEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"no seed {name!r} in the catalog at {self.folder}")

    def upsert(self, entry: CatalogEntry) -> None:
        self.entries = [e for e in self.entries if e.name != entry.name] + [entry]
        self.entries.sort(key=lambda e: e.name)

    def to_dict(self) -> dict:
        return {"format": 1, "base": self.base, "base_hash": self.base_hash, "basis": self.basis.to_dict(),
                "probes": list(self.probes), "max_new_tokens": self.max_new_tokens,
                "seeds": [e.to_dict() for e in self.entries]}

    def save(self) -> Path:
        """Write catalog.json atomically (temp file renamed), so a reader never sees half a catalog."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / CATALOG_FILE
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path


def load_catalog(folder: str | Path) -> Catalog:
    folder = Path(folder).expanduser()
    path = folder / CATALOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no seed catalog at {folder} ({CATALOG_FILE} is missing); build one with "
                                f"`bouquet seeds build --out {folder}`")
    return catalog_from_json(path.read_text(), folder, where=str(path))


def catalog_from_json(text: str, folder: str | Path = ".", where: str = "the catalog") -> Catalog:
    """Parse catalog.json's text (a device gets it in a message; `folder` only matters for seed paths)."""
    try:
        obj = json.loads(text)
        return Catalog(folder=Path(folder), base=str(obj["base"]), base_hash=str(obj["base_hash"]),
                       basis=AttributeBasis.from_dict(obj["basis"]), probes=[str(p) for p in obj["probes"]],
                       max_new_tokens=int(obj["max_new_tokens"]),
                       entries=[CatalogEntry.from_dict(e) for e in obj["seeds"]])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where} is not a bouquet seed catalog ({type(err).__name__}: {err}); rebuild it with "
                         f"`bouquet seeds build`") from None
