"""Progress of long work on a device: a rich bar on a terminal, periodic log lines elsewhere
(Ray actors and SuperNodes log to files)."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

log = logging.getLogger("bouquet")
if not log.handlers:  # Ray actors and SuperNodes start with bare logging; make progress visible there
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("bouquet %(levelname)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class StepProgress:
    def __init__(self, total: int, desc: str, every: float = 0.2):
        self.total, self.desc, self.every = total, desc, every
        self.done, self.start, self.next_report = 0, time.perf_counter(), every
        self.postfix = ""

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if postfix:
            self.postfix = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items())
        if self.done >= self.total or self.done / max(self.total, 1) >= self.next_report:
            self.next_report += self.every
            rate = (time.perf_counter() - self.start) / max(self.done, 1)
            log.info("%s: %d/%d (%.2f s each) %s", self.desc, self.done, self.total, rate, self.postfix)


@contextmanager
def progress(total: int, desc: str):
    """Yields an object with update(n=1, **postfix)."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[post]}"), transient=True) as bar:
            task = bar.add_task(desc, total=total, post="")

            class _Rich:
                def update(self, n: int = 1, **postfix) -> None:
                    post = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items())
                    bar.update(task, advance=n, post=post)

            yield _Rich()
    else:
        yield StepProgress(total, desc)
