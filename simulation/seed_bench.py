"""`bouquet seeds bench`: XPerT's seed choice against trying the seeds, on styleqa users of a built catalog.

    bouquet seeds bench --catalog runs/catalog [--out runs/seeds-bench] [--users-per-style 2] [--history 16]

Four comparisons, each printed and written to <out>/report.json and report.md (with figures beside it,
simulation.seed_bench_plots):
  1. accuracy: users of style s should pick the seed built for s; XPerT (explanations only), exhaustive search
     and successive halving (both score the seeds' loss on the user's history), with confusion matrices;
  2. cost against catalog size (4, 8, 16, 32 seeds of the tiny model): XPerT's selection stays flat, the
     searches grow with the catalog;
  3. never from scratch: a LoRA fine-tuned from the selected seed against one from the base, held-out loss
     along the steps: how many steps (and seconds) the selected seed needs to reach the base's final loss;
  4. the pool: the adapter a newcomer assembles from its seed's pool (pieces that sharers trained on that
     seed) against the one assembled from the base's pool (the same sharers, trained on the base).

Users are slices of each style's styleqa training rows taken from the end, so they never overlap the rows the
seeds were built from (the start of the file) nor the probe questions (test questions).

Rerunning into the same --out resumes. Against a catalog that changed since (seeds rebuilt or re-explained),
everything that depends on it is done again, and only that: a user's own style direction depends on the base
and the answer length, so XPerT chooses again from it without generating; the searches run again; fine-tuning
from the base is kept and from the chosen seed redone where the choice or its weights changed; the pools are
filled again.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.explain_seed import minilm_embed
from coordinator.pool import PiecePool
from coordinator.validation import RegisteredSeed, seed_shapes
from participants.assembly import AssemblySettings
from participants.cutting import cut_into_pieces
from participants.gate_training import train_gates
from participants.lora_training import LoraSettings, train_private_lora
from participants.progress import log, progress
from participants.seed_loading import forget_seed, load_seed
from participants.seed_search import exhaustive_search, mean_loss, record_losses, successive_halving
from participants.style_direction import choose_from_catalog, select_seed
from protocols.catalog import Catalog, load_catalog
from protocols.explanations import decompose, l1_distance, mix_distance, noise_scale, paired_differences
from simulation.datasets import UserData, find_styleqa, styleqa_rows
from simulation.seed_bench_plots import write_plots
from simulation.seed_building import ANSWERS_FILE

_STYLE_SEED = re.compile(r"^style(\d+)$")


@dataclass(frozen=True)
class SeedBenchSettings:
    users_per_style: int = 3
    search_users_per_style: int = 1  # the searches load every seed per user: run them on the first N users only
    history: int = 16
    test: int = 6
    ft_steps: int = 30  # fine-tuning steps from the base and from the selected seed
    eval_every: int = 3
    styles_for_tuning: int = 4  # styles (the first N of the catalog) in comparisons 3 and 4
    sharer_steps: int = 20
    gate_steps: int = 10
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    batch_size: int = 4
    max_len: int = 128
    min_items: int = 2  # successive halving's first budget
    scaling_sizes: tuple[int, ...] = (4, 8, 16, 32)
    random_seed: int = 0

    def lora(self, steps: int) -> LoraSettings:
        return LoraSettings(rank=self.rank, alpha=self.alpha, steps=steps, lr=self.lr, batch_size=self.batch_size,
                            max_len=self.max_len, seed=self.random_seed)


def style_seeds(catalog: Catalog) -> dict[int, str]:
    """Style number -> seed name, for the catalog's seeds named "style{s}"."""
    found = {int(m.group(1)): e.name for e in catalog.entries if (m := _STYLE_SEED.match(e.name))}
    if len(found) < 2:
        raise ValueError(f"the catalog at {catalog.folder} has {len(found)} seeds named style<N>; the seed bench "
                         f"needs a styleqa catalog: `bouquet seeds build --data styleqa --out {catalog.folder}`")
    return dict(sorted(found.items()))


def bench_users(styles: list[int], s: SeedBenchSettings, per_style: int, skip: int = 0) -> list[UserData]:
    """Per style, users with disjoint slices from the end of its training rows (the seeds use the start)."""
    folder = find_styleqa()
    users = []
    span = s.history + s.test
    for style in styles:
        rows = styleqa_rows(folder, style, "train")
        for j in range(skip, skip + per_style):
            chunk = rows[len(rows) - (j + 1) * span: len(rows) - j * span]
            name = f"style{style}-u{j}"
            users.append(UserData(name, [replace(r, user=name) for r in chunk[: s.history]],
                                  [replace(r, user=name) for r in chunk[s.history:]]))
    return users


def _confusion(styles: list[int], picks: list[tuple[int, int | None]]) -> list[list[int]]:
    """Rows: the user's style; columns: the chosen seed's style, then a last column for "base / other"."""
    index = {s: i for i, s in enumerate(styles)}
    matrix = [[0] * (len(styles) + 1) for _ in styles]
    for truth, chosen in picks:
        matrix[index[truth]][index.get(chosen, len(styles)) if chosen is not None else len(styles)] += 1
    return matrix


def _style_of(seed_names: dict[str, int], name: str | None) -> int | None:
    return seed_names.get(name) if name else None


# --- 1. accuracy --------------------------------------------------------------------------------------------


def catalog_fingerprint(catalog: Catalog) -> str:
    """What the bench's results depend on in a catalog: its seeds' weights, their explanations and the basis."""
    return hashlib.sha256(json.dumps(catalog.to_dict(), sort_keys=True).encode()).hexdigest()


def _own_direction_reusable(row: dict, catalog: Catalog) -> bool:
    """A user's own style direction depends on the base and the answer length only, not on the seeds."""
    return (row.get("base_hash") == catalog.base_hash and row.get("max_new_tokens") == catalog.max_new_tokens
            and len(row.get("xpert", {}).get("direction", ())) == catalog.basis.dim)


def _choice_from_direction(row: dict, catalog: Catalog) -> dict:
    """The XPerT choice against this catalog from the user's stored direction; the time is the one measured when
    the direction was computed (the generation pass is what costs; the choice itself takes milliseconds)."""
    direction = np.asarray(row["xpert"]["direction"])
    own = decompose(direction, catalog.basis)
    selection = select_seed(own, catalog.explanations(), catalog.words)
    return row["xpert"] | {"seed": selection.seed_id, "reason": selection.reason, "distances": selection.distances,
                           "residual": own.residual}


def accuracy(catalog: Catalog, s: SeedBenchSettings, out: Path) -> dict:
    styles = style_seeds(catalog)
    names = {name: style for style, name in styles.items()}
    sources = {catalog.seed_source(name): name for name in names}
    users = bench_users(list(styles), s, s.users_per_style)
    search_users = {u.user for u in bench_users(list(styles), s, min(s.search_users_per_style, s.users_per_style))}
    base = load_seed(catalog.base)
    fingerprint = catalog_fingerprint(catalog)
    path = out / "selection.jsonl"
    done: dict[str, dict] = {}  # a later line for the same user replaces an earlier one
    for line in path.read_text().splitlines() if path.exists() else []:
        done[json.loads(line)["user"]] = json.loads(line)
    stale = [u.user for u in users if u.user in done and done[u.user].get("catalog") != fingerprint]
    if stale:
        log.info("%d users' seeds were chosen from another catalog: their choices and searches are made again "
                 "(their own style directions are kept where the base and answer length are the same)", len(stale))
    with progress(len(users), "seed choice") as bar:
        for u in users:
            row = done.get(u.user)
            if row is None or row.get("catalog") != fingerprint:
                if row is not None and _own_direction_reusable(row, catalog):
                    xpert = _choice_from_direction(row, catalog)
                else:
                    start = time.perf_counter()
                    selection, own = choose_from_catalog(base, u.history, catalog)
                    xpert = {"seed": selection.seed_id, "seconds": time.perf_counter() - start,
                             "reason": selection.reason, "distances": selection.distances, "residual": own.residual,
                             "tokens_generated": len(u.history) * catalog.max_new_tokens,
                             "direction": [float(v) for v in selection.direction]}
                searched = u.user in search_users
                full = exhaustive_search(list(sources), u.history, max_len=s.max_len) if searched else None
                halving = successive_halving(list(sources), u.history, min_items=s.min_items,
                                             max_len=s.max_len) if searched else None
                row = {"user": u.user, "style": int(u.user.split("-")[0][5:]), "catalog": fingerprint,
                       "base_hash": catalog.base_hash, "max_new_tokens": catalog.max_new_tokens, "xpert": xpert,
                       "exhaustive": _search_row(full, sources), "halving": _search_row(halving, sources)}
                with path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                done[u.user] = row
            bar.update(user=u.user)
    rows = [done[u.user] for u in users]
    report = {"styles": list(styles), "users": len(rows)}
    for method in ("xpert", "exhaustive", "halving"):
        mine = [r for r in rows if r[method] is not None]
        if not mine:  # the searches were left out (--search-users-per-style 0)
            continue
        picks = [(r["style"], _style_of(names, r[method]["seed"])) for r in mine]
        report[method] = {
            "users": len(mine), "accuracy": sum(t == c for t, c in picks) / len(picks),
            "confusion": _confusion(list(styles), picks),
            "seconds_median": statistics.median(r[method]["seconds"] for r in mine)}
        if method != "xpert":
            report[method] |= {k: statistics.median(r[method][k] for r in mine)
                               for k in ("tokens_forward", "bytes_loaded", "seeds_loaded")}
    report["xpert"]["catalog_bytes"] = len(json.dumps(catalog.to_dict()))
    report["sensitivity"] = probes_and_rule(catalog, rows)
    report["per_user"] = {r["user"]: {m: r[m]["seed"] if r[m] else None for m in ("xpert", "exhaustive", "halving")}
                          for r in rows}
    return report


def probes_and_rule(catalog: Catalog, rows: list[dict], sizes: tuple[int, ...] = (16, 32, 64, 96),
                    embed=minilm_embed) -> list[dict]:
    """XPerT's accuracy on the same users (their stored directions, nothing generated again) with the seeds
    re-explained from the first n of the catalog's probes, by the mix distance (the rule in use) and by L1 on
    the raw coefficients (the authors' rule): how much the figure owes to the probe count and to the rule."""
    names = {name: style for style, name in style_seeds(catalog).items()}
    try:
        answers = {name: json.loads((catalog.seed_folder(name) / ANSWERS_FILE).read_text()) for name in names}
    except FileNotFoundError as err:
        log.info("no probe answers beside the seeds (%s): accuracy against the probe count left out", err)
        return []
    differences = {}
    for name, a in answers.items():  # the probes the catalog was explained from, in its order
        at = [a["probes"].index(p) for p in catalog.probes]
        differences[name] = paired_differences([a["seed"][i] for i in at], [a["base"][i] for i in at], embed)
    table = []
    for n in sorted({k for k in sizes if k < len(catalog.probes)} | {len(catalog.probes)}):
        basis = catalog.basis
        if basis.scale is not None:  # the noise scale, like the explanations, from these n probes only
            basis = replace(basis, scale=noise_scale([d[:n] for d in differences.values()]))
        seeds = {name: decompose(d[:n].mean(axis=0), basis) for name, d in differences.items()}
        users = [(r["style"], decompose(np.asarray(r["xpert"]["direction"]), basis)) for r in rows]
        row = {"probes": n}
        for rule, distance in (("mix", mix_distance), ("raw", l1_distance)):
            picks = [names[select_seed(own, seeds, basis.words, distance=distance).seed_id] for _, own in users]
            row[rule] = sum(p == style for p, (style, _) in zip(picks, users)) / len(users)
        table.append(row)
    return table


def _search_row(result, sources: dict[str, str]) -> dict | None:
    if result is None:
        return None
    return {"seed": sources[result.seed_id], "seconds": result.seconds, "tokens_forward": result.tokens_forward,
            "bytes_loaded": result.bytes_loaded, "seeds_loaded": result.seeds_loaded,
            "losses": {sources[k]: v for k, v in result.losses.items()}}


# --- 2. cost against catalog size (tiny seeds) ----------------------------------------------------------------


def scaling(s: SeedBenchSettings, out: Path) -> list[dict]:
    """Catalogs of 4..32 tiny seeds (base + a random delta each, explained like real seeds): selection cost."""
    from simulation.tiny_catalog import build_tiny_catalog

    largest = build_tiny_catalog(out / "tiny-catalog", max(s.scaling_sizes), seed=s.random_seed)
    user = bench_users([1], replace(s, test=1), 1)[0]
    base = load_seed(largest.base)
    rows = []
    with progress(len(s.scaling_sizes), "cost vs catalog size") as bar:
        for n in s.scaling_sizes:
            sub = replace(largest, entries=largest.entries[:n])
            sources = [sub.seed_source(e.name) for e in sub.entries]
            xpert = []
            for _ in range(3):
                start = time.perf_counter()
                choose_from_catalog(base, user.history, sub)
                xpert.append(time.perf_counter() - start)
            full = exhaustive_search(sources, user.history, max_len=s.max_len)
            halving = successive_halving(sources, user.history, min_items=s.min_items, max_len=s.max_len)
            rows.append({"seeds": n, "xpert_seconds": statistics.median(xpert),
                         "xpert_bytes": len(json.dumps(sub.to_dict())),
                         "exhaustive_seconds": full.seconds, "exhaustive_tokens": full.tokens_forward,
                         "exhaustive_bytes": full.bytes_loaded, "halving_seconds": halving.seconds,
                         "halving_tokens": halving.tokens_forward, "halving_bytes": halving.bytes_loaded})
            bar.update(seeds=n)
    return rows


# --- 3. never from scratch ------------------------------------------------------------------------------------


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
                _write_json(path, done)
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


# --- 4. the selected seed's pool against the base's pool -------------------------------------------------------


def pools(catalog: Catalog, selection: dict, s: SeedBenchSettings, out: Path) -> list[dict]:
    """Sharers (other users of the same styles) train on the seed they select and, for the reference, on the base;
    each target assembles from its seed's pool and from the base's pool."""
    from simulation.bench import perpcs
    from participants.evaluation import perplexity

    styles = list(style_seeds(catalog))[: s.styles_for_tuning]
    targets = bench_users(styles, s, 1)
    sharers = bench_users(styles, s, 1, skip=s.users_per_style)
    path = out / "pools.json"
    fingerprint = catalog_fingerprint(catalog)
    state = json.loads(path.read_text()) if path.exists() else {}
    if state.get("catalog") != fingerprint:
        if state:  # sharers chose and trained on another catalog's seeds: their pieces are not this catalog's pool
            log.info("the pools in %s were filled for another catalog: filling them again", out / "pool")
            shutil.rmtree(out / "pool", ignore_errors=True)
        state = {"catalog": fingerprint, "sharers": {}, "targets": {}}
    base_desc = load_seed(catalog.base).descriptor
    with PiecePool(out / "pool") as pool:
        pool.register_seed(RegisteredSeed(base_desc.seed_id, base_desc.content_hash, seed_shapes(base_desc.path)))
        with progress(len(sharers), "sharers (seed and base)") as bar:
            for u in sharers:
                if u.user not in state["sharers"]:
                    selected, _ = choose_from_catalog(load_seed(catalog.base), u.history, catalog)
                    sources = [catalog.base] + ([catalog.seed_source(selected.seed_id)] if selected.seed_id else [])
                    for source in sources:
                        seed = load_seed(source)
                        if seed.descriptor.delta:
                            pool.register_seed(RegisteredSeed(seed.descriptor.seed_id, seed.descriptor.content_hash,
                                                              seed_shapes(seed.descriptor.path)))
                        weights, _ = train_private_lora(seed, u.history, s.lora(s.sharer_steps),
                                                        desc=f"{u.user} on {Path(source).name}")
                        gates, _ = train_gates(seed, u.history, weights, s.lora(s.sharer_steps), steps=s.gate_steps,
                                               lr=5e-3, desc=f"{u.user}: gates")
                        key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"seeds:{u.user}".encode()).digest())
                        pool.add_many(cut_into_pieces(seed.descriptor, weights, gates, s.rank, s.alpha, key))
                    state["sharers"][u.user] = selected.seed_id or "base"
                    _write_json(path, state)
                bar.update(user=u.user)
        settings = AssemblySettings(top_k=3, shortlist=6, max_len=s.max_len)
        with progress(len(targets), "assembly from each pool") as bar:
            for u in targets:
                if u.user not in state["targets"]:
                    chosen = selection["per_user"][u.user]["xpert"]
                    row = {"seed": chosen or "base"}
                    for label, source in (("base_pool", catalog.base),
                                          ("seed_pool", catalog.seed_source(chosen) if chosen else catalog.base)):
                        seed = load_seed(source)
                        candidates = pool.get([pid for pid, *_ in pool.gates(seed.descriptor.seed_id)])
                        if not candidates:
                            row[label] = None
                            continue
                        outcome, _ = perpcs(seed, u.history, candidates, settings)
                        row[label] = {"perplexity": perplexity(seed, u.test, outcome.adapter, max_len=s.max_len),
                                      "seed_alone": perplexity(seed, u.test, None, max_len=s.max_len),
                                      "candidates": len(candidates), "seconds": outcome.seconds}
                    state["targets"][u.user] = row
                    _write_json(path, state)
                bar.update(user=u.user)
    return [{"user": u.user} | state["targets"][u.user] for u in targets]


# --- the run and its report -----------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def run_seed_bench(catalog_dir: str | Path, out: str | Path, s: SeedBenchSettings = SeedBenchSettings(),
                   parts: tuple[str, ...] = ("accuracy", "scaling", "tuning", "pools")) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != json.loads(json.dumps(asdict(s))):
        raise ValueError(f"{out} holds a seed bench with other settings; choose another --out or remove it")
    _write_json(settings_path, asdict(s))
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
    _write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    return report


def _matrix(title: str, styles: list[int], matrix: list[list[int]]) -> list[str]:
    head = "| user style | " + " | ".join(f"s{s}" for s in styles) + " | base |"
    lines = [f"**{title}** (rows: the user's style; columns: the seed chosen)", "", head,
             "|" + "---|" * (len(styles) + 2)]
    lines += [f"| s{st} | " + " | ".join(str(n) for n in row) + " |" for st, row in zip(styles, matrix)]
    return lines + [""]


def _figure(report: dict, name: str, title: str) -> list[str]:
    return [f"![{title}]({name})", ""] if name in report.get("plots", ()) else []


def markdown(report: dict) -> str:
    acc = report["accuracy"]
    styles = acc["styles"]
    parts = ["# bouquet seeds bench", "", f"catalog `{report['catalog']}` · base `{report['base']}` · "
             f"{acc['users']} users, {report['settings']['history']} history items each", "",
             "## 1. selection accuracy", "",
             "| method | users | accuracy | seconds per user | tokens forward | bytes downloaded | seeds loaded |",
             "|---|---|---|---|---|---|---|"]
    x = acc["xpert"]
    parts.append(f"| XPerT (explanations) | {x['users']} | {x['accuracy']:.1%} | {x['seconds_median']:.1f} | "
                 f"{report['settings']['history']} answers generated | {x['catalog_bytes']:,} (catalog.json) | 0 |")
    for m, label in (("exhaustive", "exhaustive search"), ("halving", "successive halving")):
        if m not in acc:
            continue
        r = acc[m]
        parts.append(f"| {label} | {r['users']} | {r['accuracy']:.1%} | {r['seconds_median']:.1f} | {r['tokens_forward']:,.0f} | "
                     f"{r['bytes_loaded']:,.0f} | {r['seeds_loaded']:.0f} |")
    parts.append("")
    target = "**met**" if x["accuracy"] >= 0.95 else "**not met**"
    parts += [f"Target (XPerT picks the seed of the user's style ≥ 95%): {target} ({x['accuracy']:.1%}).", ""]
    for m, label in (("xpert", "XPerT"), ("exhaustive", "exhaustive search"), ("halving", "successive halving")):
        if m in acc:
            parts += _matrix(label, styles, acc[m]["confusion"])
    parts += _figure(report, "confusion.png", "XPerT's choices") + _figure(report, "explanations.png",
                                                                           "each seed's mix of attributes")
    if acc.get("sensitivity"):
        parts += ["**XPerT on the same users, the seeds explained from the first n probes** (mix: L1 between "
                  "attribute shares, the rule in use; raw: L1 between the coefficients themselves)", "",
                  "| probes | mix L1 | raw L1 |", "|---|---|---|"]
        parts += [f"| {r['probes']} | {r['mix']:.1%} | {r['raw']:.1%} |" for r in acc["sensitivity"]]
        parts.append("")
    if "scaling" in report:
        parts += ["## 2. selection cost against catalog size (tiny-model seeds)", "",
                  "| seeds | XPerT s | XPerT bytes | exhaustive s | exhaustive tokens | exhaustive bytes | "
                  "halving s | halving tokens | halving bytes |", "|---|---|---|---|---|---|---|---|---|"]
        parts += [f"| {r['seeds']} | {r['xpert_seconds']:.3f} | {r['xpert_bytes']:,} | {r['exhaustive_seconds']:.2f} | "
                  f"{r['exhaustive_tokens']:,} | {r['exhaustive_bytes']:,} | {r['halving_seconds']:.2f} | "
                  f"{r['halving_tokens']:,} | {r['halving_bytes']:,} |" for r in report["scaling"]]
        first, last = report["scaling"][0], report["scaling"][-1]
        growth = last["seeds"] / first["seeds"]
        parts += ["", f"From {first['seeds']} to {last['seeds']} seeds ({growth:.0f}×): XPerT's time "
                  f"×{last['xpert_seconds'] / first['xpert_seconds']:.2f}, exhaustive search's time "
                  f"×{last['exhaustive_seconds'] / first['exhaustive_seconds']:.2f} and tokens "
                  f"×{last['exhaustive_tokens'] / first['exhaustive_tokens']:.2f}.", ""]
        parts += _figure(report, "cost_vs_catalog.png", "selection cost against catalog size")
    if "tuning" in report:
        parts += ["## 3. never from scratch: fine-tuning from the selected seed vs. from the base", "",
                  "| user | seed | base: loss at 0 → best | selected: loss at 0 → best | steps to the base's best "
                  "loss: base / selected | seconds: base / selected |", "|---|---|---|---|---|---|"]
        met = True
        for r in report["tuning"]:
            b, sel = r["base"]["curve"], r["selected"]["curve"]
            br, sr = r["base_reaches"], r["selected_reaches"]
            met &= sr is not None and br is not None and sr[0] <= br[0] / 2
            parts.append(f"| {r['user']} | {r['seed']} | {b[0][1]:.3f} → {min(x[1] for x in b):.3f} | "
                         f"{sel[0][1]:.3f} → {min(x[1] for x in sel):.3f} | {br[0] if br else '–'} / {sr[0] if sr else 'never'} | "
                         f"{br[1] if br else float('nan'):.1f} / {sr[1] if sr else float('nan'):.1f} |")
        parts += ["", f"Target (fine-tuning from the selected seed reaches the best held-out loss that fine-tuning from "
                  f"the base reaches, in at most half the steps): "
                  f"{'**met**' if met else '**not met**'}.", ""]
        parts += _figure(report, "fine_tuning.png", "held-out loss along fine-tuning")
    if "pools" in report:
        parts += ["## 4. assembling from the selected seed's pool vs. the base's pool", "",
                  "| user | seed | base alone | assembled from base pool | selected seed alone | assembled from its "
                  "pool |", "|---|---|---|---|---|---|"]
        wins = []
        for r in report["pools"]:
            b, sp = r.get("base_pool"), r.get("seed_pool")
            fmt = (lambda v, k: f"{v[k]:.3f}" if v else "–")
            parts.append(f"| {r['user']} | {r['seed']} | {fmt(b, 'seed_alone')} | {fmt(b, 'perplexity')} | "
                         f"{fmt(sp, 'seed_alone')} | {fmt(sp, 'perplexity')} |")
            if b and sp:
                wins.append(sp["perplexity"] < b["perplexity"])
        parts += ["", f"Target (assembled from the selected seed's pool beats the base's pool in perplexity): "
                  f"{'**met**' if wins and all(wins) else '**not met**'} ({sum(wins)}/{len(wins)} users).", ""]
    return "\n".join(parts) + "\n"
