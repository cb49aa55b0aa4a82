"""Comparison 3, never from scratch: a LoRA fine-tuned from the selected seed against one from the base,
held-out loss along the steps: how many steps (and seconds) the selected seed needs to reach the best loss
that fine-tuning from the base reaches.

The base's curve depends on the base only: against a changed catalog it is kept, and the selected seed's curve
is redone where the choice or its weights changed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from participants.lora_training import train_private_lora
from participants.progress import progress
from participants.seed_loading import forget_seed, load_seed
from participants.seed_search import mean_loss, record_losses
from protocols.catalog import Catalog
from protocols.files import write_json
from simulation.seeds_bench.settings import SeedBenchSettings
from simulation.seeds_bench.users import bench_users, style_seeds
from simulation.user_data import UserData


def never_from_scratch(catalog: Catalog, selection: dict, s: SeedBenchSettings, out: Path) -> list[dict]:
    styles = list(style_seeds(catalog))[: s.styles_for_tuning]
    users = bench_users(styles, s, 1)
    path = out / "tuning.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    with progress(len(users), "never from scratch") as bar:
        for u in users:
            chosen = selection["per_user"][u.user]["xpert"]
            weights = catalog.entry(chosen).content_hash if chosen else catalog.base_hash
            row = done.get(u.user)
            if row is None or (row["seed"], row.get("seed_hash")) != (chosen or "base", weights):
                # the base's curve depends on the base only: kept when just the chosen seed changed
                base_run = row["base"] if row and row.get("base_hash") == catalog.base_hash else \
                    _tune_curve(catalog.base, u, s)
                seed_run = _tune_curve(catalog.seed_source(chosen), u, s) if chosen else base_run
                if chosen:
                    forget_seed(catalog.seed_source(chosen))
                done[u.user] = {"seed": chosen or "base", "seed_hash": weights, "base_hash": catalog.base_hash,
                                "base": base_run, "selected": seed_run}
                write_json(path, done)
            bar.update(user=u.user)
    rows = []
    for u in users:
        row = done[u.user]
        # the loss to reach is the best the base's fine-tune gets (it overfits after that on 16 items)
        target = min(loss for _, loss, _ in row["base"]["curve"])
        rows.append({"user": u.user, "seed": row["seed"], "base": row["base"], "selected": row["selected"],
                     "target_loss": target, "base_reaches": _first_reaching(row["base"]["curve"], target),
                     "selected_reaches": _first_reaching(row["selected"]["curve"], target)})
    return rows


def _tune_curve(source: str, user: UserData, s: SeedBenchSettings) -> dict:
    """Fine-tune a fresh LoRA on the user's history from `source`; held-out loss every few steps."""
    seed = load_seed(source)
    start_loss = mean_loss(record_losses(seed, user.test, max_len=s.max_len)[0])
    curve: list[tuple[int, float, float]] = [(0, start_loss, 0.0)]
    clock = {"t0": time.perf_counter(), "paused": 0.0}

    def on_step(step: int, report) -> None:
        if step % s.eval_every and step != s.ft_steps:
            return
        pause = time.perf_counter()
        loss = mean_loss(record_losses(seed, user.test, max_len=s.max_len)[0])
        curve.append((step, loss, pause - clock["t0"] - clock["paused"]))
        clock["paused"] += time.perf_counter() - pause

    _, report = train_private_lora(seed, user.history, s.lora(s.ft_steps), desc=f"{user.user}: ft from "
                                   f"{Path(source).name}", on_step=on_step)
    return {"curve": curve, "seconds": report.seconds, "tokens": report.tokens}


def _first_reaching(curve: list, target: float) -> tuple[int, float] | None:
    for step, loss, seconds in curve:
        if loss <= target + 1e-9:
            return step, seconds
    return None
