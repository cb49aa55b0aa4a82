"""The device's ε ledger: every differentially private release it made, and the total it has spent.

    privacy-ledger.json  {"epsilon-spent": 2.0, "delta-spent": 2e-05,
                          "releases": [{"what": "profile", "epsilon": 1.0, "delta": 1e-05, "time": 1700000000.0}],
                          "shares": [1700000100.0]}

"shares" holds the time of every share request it accepted (with or without DP-SGD), for the policy's
min-hours-between-shares.

Releases compose by basic composition: ε and δ add up. A release that would take the total ε past the policy's
epsilon-budget is refused before anything is computed or sent; one that fits is written down (to a temp file,
renamed into place, under a lock) before its result leaves the device, so a crash never forgets a release. A
ledger that does not read refuses every release: deleting it is the owner's choice, never the code's.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from participants.privacy_policy import POLICY_FILE, PolicyRefused

LEDGER_FILE = "privacy-ledger.json"


class BudgetExceeded(PolicyRefused):
    """A release past the policy's epsilon-budget."""


class PrivacyLedger:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def releases(self) -> list[dict]:
        return self._read()["releases"]

    def shares(self) -> list[float]:
        return self._read()["shares"]

    def _read(self) -> dict:
        if not self.path.exists():
            return {"releases": [], "shares": []}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            releases, shares = data["releases"], data.get("shares", [])
            if not all(isinstance(r["epsilon"], (int, float)) and isinstance(r["delta"], (int, float))
                       for r in releases):
                raise ValueError("a release without numeric epsilon and delta")
            if not all(isinstance(t, (int, float)) for t in shares):
                raise ValueError("a share without a numeric time")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.path}: not a privacy ledger ({err}); this device refuses every release until "
                             f"its owner repairs or removes the file") from None
        return {"releases": releases, "shares": shares}

    def spent(self) -> tuple[float, float]:
        """(ε, δ) spent so far."""
        releases = self.releases()
        return sum(r["epsilon"] for r in releases), sum(r["delta"] for r in releases)

    def spend(self, what: str, epsilon: float, delta: float, budget: float) -> float:
        """Write down a release of (ε, δ), or refuse it when the total would pass `budget`; the new total ε."""
        with self._locked():
            data = self._read()
            releases = data["releases"]
            total = sum(r["epsilon"] for r in releases)
            if total + epsilon > budget * (1 + 1e-12):
                raise BudgetExceeded(f"refused by this device's {POLICY_FILE}: key 'epsilon-budget' {budget:g} would "
                                     f"be exceeded: {total:g} spent, this {what} release costs ε = {epsilon:g}")
            releases = releases + [{"what": what, "epsilon": float(epsilon), "delta": float(delta),
                                    "time": time.time()}]
            total += epsilon
            self._write({"epsilon-spent": total, "delta-spent": sum(r["delta"] for r in releases),
                         "releases": releases, "shares": data["shares"]})
            return total

    def record_share(self, min_hours_between: float) -> None:
        """Write down a share request now, or refuse it when the last one was less than `min_hours_between` ago."""
        with self._locked():
            data = self._read()
            now = time.time()
            last = max(data["shares"], default=None)
            if last is not None and now - last < min_hours_between * 3600:
                wait = (last + min_hours_between * 3600 - now) / 3600
                raise PolicyRefused(f"refused by this device's {POLICY_FILE}: key 'min-hours-between-shares' is "
                                    f"{min_hours_between:g}; it shared {(now - last) / 3600:.2f} h ago (next share "
                                    f"in {wait:.2f} h)")
            releases = data["releases"]
            self._write({"epsilon-spent": sum(r["epsilon"] for r in releases),
                         "delta-spent": sum(r["delta"] for r in releases), "releases": releases,
                         "shares": data["shares"] + [now]})

    @contextmanager
    def _locked(self):
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, data: dict) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
