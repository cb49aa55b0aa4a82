"""results.jsonl: one finished unit of work per line, appended as soon as it is done, so a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path

from participants.progress import log
from simulation.fidelity import FidelityJudge


class Results:
    """results.jsonl: one finished unit of work per line, appended as soon as it is done."""

    def __init__(self, path: Path):
        self.path, self.rows = path, []
        if path.exists():
            lines = path.read_text().splitlines()
            for n, line in enumerate(lines):
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if n < len(lines) - 1:
                        raise ValueError(f"{path}:{n + 1} is not JSON; the results file is damaged") from None
                    path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))  # a torn last line
        self.done = {self.key(r) for r in self.rows}

    @staticmethod
    def key(row: dict) -> tuple:
        if row["kind"] == "method":
            return row["kind"], row["target"], row["method"]
        if row["kind"] == "sweep":
            return row["kind"], row["sweep"], row["value"]
        return row["kind"], row["user"]  # a gate check of a sharer, the oracle of a target

    def rejudge(self, judge: FidelityJudge) -> None:
        """Score the stored generations again where the judge has changed since they were scored: fidelity
        is a function of the generations, so a better judge needs no model rerun."""
        stale = [r for r in self.rows if r["kind"] == "method" and r.get("judge") != judge.version]
        if not stale:
            return
        for r in stale:
            r["fidelity"], r["judge"] = judge.fidelity(r["target"], r["generations"]), judge.version
        log.info("re-scored the fidelity of %d stored results with judge %s", len(stale), judge.version)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        tmp.replace(self.path)

    def append(self, row: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self.done.add(self.key(row))


