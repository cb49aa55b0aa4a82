"""One seeds bench run: the comparisons asked for, into one folder, resumed when rerun with the same settings."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from protocols.catalog import load_catalog
from protocols.files import write_json
from simulation.seeds_bench.accuracy import accuracy
from simulation.seeds_bench.plots import write_plots
from simulation.seeds_bench.pools import pools
from simulation.seeds_bench.report import markdown
from simulation.seeds_bench.scaling import scaling
from simulation.seeds_bench.settings import SeedBenchSettings
from simulation.seeds_bench.tuning import never_from_scratch

PARTS = ("accuracy", "scaling", "tuning", "pools")


def run_seed_bench(catalog_dir: str | Path, out: str | Path, s: SeedBenchSettings = SeedBenchSettings(),
                   parts: tuple[str, ...] = PARTS) -> dict:
    """The report (also written as report.json and report.md, with figures, to `out`); accuracy always runs,
    since the others start from its choices."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != json.loads(json.dumps(asdict(s))):
        raise ValueError(f"{out} holds a seed bench with other settings; choose another --out or remove it")
    write_json(settings_path, asdict(s))
    catalog = load_catalog(catalog_dir)
    report: dict = {"catalog": str(catalog.folder), "base": catalog.base, "settings": asdict(s)}
    report["accuracy"] = accuracy(catalog, s, out)
    if "scaling" in parts:
        report["scaling"] = scaling(s, out)
    if "tuning" in parts:
        report["tuning"] = never_from_scratch(catalog, report["accuracy"], s, out)
    if "pools" in parts:
        report["pools"] = pools(catalog, report["accuracy"], s, out)
    report["plots"] = write_plots(out, report, catalog)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    return report
