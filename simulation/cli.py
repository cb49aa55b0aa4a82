"""The `bouquet` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from protocols.seeds import DEFAULT_SEED, EMBEDDED_PREFIX, TINY
from protocols.settings import describe_range, key


def add_settings_flags(p: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                       defaults: dict | None = None, preset: bool = False) -> None:
    """One flag per field of a settings class (protocols.settings): `--lora-rank` for `lora_rank`, with the
    field's help, range and default. With `preset`, flags default to None so that a preset can fill them."""
    defaults = defaults or {}
    for f in fields(cls):
        if "help" not in f.metadata or f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        shown = "none" if default in ("", None, ()) else ",".join(map(str, default)) if isinstance(default, tuple) \
            else default
        extra = ", ".join(x for x in (describe_range(f), f"default {shown}" + (", or the preset's" if preset else ""))
                          if x)
        kw = {"dest": f.name, "help": f"{f.metadata['help']} ({extra})".replace("%", "%%"),
              "default": None if preset else default}
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, tuple):
            kw["type"] = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())
        else:
            declared = str(f.type)  # "int | None", "float | None": a default of None says nothing of the type
            kw["type"] = type(f.default) if f.default is not None else (
                int if declared.startswith("int") else float if declared.startswith("float") else str)
        p.add_argument("--" + key(f.name), **kw)


def settings_from(args, cls: type, **values):
    """The settings class filled from the parsed flags of its fields, plus `values`."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)} | values)


def _local_model(model: str) -> None:
    if model.startswith(EMBEDDED_PREFIX) or model == TINY or Path(model).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a hub


def _add_simulate(sub) -> None:
    from simulation.settings import SimulateSettings

    p = sub.add_parser("simulate", help="run sharers and newcomers as a Flower simulation on real per-user data")
    add_settings_flags(p, SimulateSettings, skip=("min_nodes",), defaults={"out_dir": "runs/simulate"})
    p.add_argument("--prepare-only", action="store_true",
                   help="only write the virtual devices under OUT-DIR/devices (e.g. for `flwr run`), then stop")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args) -> int:
    from simulation.datasets import load_users
    from simulation.federation import run_federation
    from simulation.settings import SimulateSettings
    from simulation.summary import print_summary

    s = settings_from(args, SimulateSettings)
    try:
        policy = s.device_policy()  # a bad --policy file or flag stops here, before any work
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _local_model(s.seed_model)
    wanted = s.sharers + s.newcomers
    users = load_users(s.data, history_size=s.history, test_size=s.test, max_users=s.users, seed=s.rng_seed)
    if len(users) < wanted:
        print(f"error: {s.data} gives {len(users)} users with {s.history}+{s.test} items, but "
              f"{s.sharers} sharers + {s.newcomers} newcomers need {wanted}; lower --sharers/--newcomers "
              f"or --history/--test", file=sys.stderr)
        return 2
    out = Path(s.out_dir)
    if (out / "metrics.json").exists() or (out / "pool").exists():
        print(f"error: {out} already holds a run; choose another --out-dir or remove it", file=sys.stderr)
        return 2
    if args.prepare_only:
        from simulation.federation import prepare_devices

        prepare_devices(users, out, s.rng_seed, policy)
        print(f"{len(users)} devices written to {out / 'devices'}")
        return 0
    if s.catalog:
        from protocols.catalog import load_catalog

        catalog = load_catalog(s.catalog)
        if s.seed_model != catalog.base:
            print(f"error: the catalog at {s.catalog} is built on {catalog.base!r}; run with --seed-model "
                  f"{catalog.base}", file=sys.stderr)
            return 2
        s = replace(s, catalog=str(Path(s.catalog).resolve()))
    s = replace(s, min_nodes=len(users))
    start = time.perf_counter()
    if s.audit_wire:
        summary = _audited_federation(users, s, out)
    else:
        summary = run_federation(users, s)  # the coordinator's metrics.json joined with the devices' users
    summary["wall_seconds"] = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_summary(summary, out)
    return 0


def _audited_federation(users, s, out: Path) -> dict:
    """run_federation with the message audit (simulation.wire_audit) around it; the audit in wire-audit.json."""
    from simulation.federation import prepare_devices, simulate_devices
    from simulation.wire_audit import audit_run, auditing_server_app, coordinator_log

    mapping = prepare_devices(users, out, s.rng_seed, s.device_policy())
    grids: list = []
    with coordinator_log() as captured:
        summary = simulate_devices(out, mapping, s, server_app=auditing_server_app(s, grids))
    public = [(Path(s.catalog) / "catalog.json").read_text()] if s.catalog else []
    audit = audit_run([u for u in users if u.user in mapping.values()], out, grids[0], captured.getvalue(), public)
    (out / "wire-audit.json").write_text(json.dumps(audit, indent=1))
    verdict = "no leak" if not audit["leaks"] else f"{len(audit['leaks'])} LEAKS"
    print(f"wire audit: {audit['messages']} messages ({audit['message-bytes']:,} bytes), "
          f"{audit['coordinator-files']} coordinator files and its log searched for {audit['secrets-searched']:,} "
          f"private strings of {audit['users']} users: {verdict} (details in {out / 'wire-audit.json'})")
    return summary


def _add_bench(sub) -> None:
    from simulation.bench.settings import PRESETS, BenchSettings

    p = sub.add_parser("bench", help="compare Per-Pcs with its baselines (seed, OPPU, retrieval, random pieces, "
                                     "Per-Pcs + fine-tune) on held-out data, in one process")
    p.add_argument("--out", default="runs/bench", help="run directory; rerun with the same settings to resume "
                                                         "(default %(default)s)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="defaults sized for 2 CPU cores and SmolLM2 (under 30 min); explicit flags override them")
    add_settings_flags(p, BenchSettings, skip=("max_seed_distance",
                                               "assembly_batch_size"), preset=True)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from simulation.bench.report import markdown_table
    from simulation.bench.run import run_bench
    from simulation.bench.settings import BenchSettings, resolve_settings

    settings = resolve_settings(args.preset, **{f.name: getattr(args, f.name) for f in fields(BenchSettings)
                                                if hasattr(args, f.name)})
    _local_model(settings.seed_model)
    report = run_bench(settings, args.out)
    print(markdown_table(report))
    for t in report["targets"]:
        print(f"{'not measured' if t['met'] is None else 'met' if t['met'] else 'not met'}: {t['target']} "
              f"({t['evidence']})")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _add_privacy_audit(sub) -> None:
    from simulation.privacy_audit.settings import AuditSettings

    p = sub.add_parser("privacy-audit", help="attack what sharers release (membership inference, extraction, gates, "
                                             "profile) against the share ratio and DP-SGD's ε, beside Per-Pcs's "
                                             "utility, on real data")
    p.add_argument("--out", default="runs/privacy-audit", help="run directory; rerun with the same settings to "
                                                                "resume or to add share ratios or ε (default "
                                                                "%(default)s)")
    add_settings_flags(p, AuditSettings, skip=("generate", "max_seed_distance"))
    p.set_defaults(func=cmd_privacy_audit)


def cmd_privacy_audit(args) -> int:
    from simulation.privacy_audit.run import run_audit
    from simulation.privacy_audit.settings import AuditSettings

    settings = settings_from(args, AuditSettings)
    _local_model(settings.seed_model)
    report = run_audit(settings, args.out)
    print((Path(args.out) / "report.md").read_text().split("\n## plots")[0])
    return 0 if report["summaries"] else 1


def _add_data(sub) -> None:
    from simulation.shakespeare import add_command as add_shakespeare

    p = sub.add_parser("data", help="write a personal-data JSONL file (`--data FILE` of bench and simulate) from a "
                                    "real corpus")
    dsub = p.add_subparsers(dest="data_command", required=True)
    add_shakespeare(dsub)


def _add_pool(sub) -> None:
    p = sub.add_parser("pool", help="inspect a piece pool")
    psub = p.add_subparsers(dest="pool_command", required=True)
    v = psub.add_parser("verify", help="check every stored piece against its index row: digest, signature, seed, "
                                       "position, rank, contributor, finiteness and bounds")
    v.add_argument("dir", help="a run directory or a pool directory")
    v.add_argument("--repair", action="store_true", help="remove the temp files crashed writers left behind")
    v.set_defaults(func=cmd_pool_verify)


def cmd_pool_verify(args) -> int:
    """Exit 0: all good; 1: problems listed; 2: no pool there, or one that cannot be opened (one line, no
    traceback)."""
    import sqlite3

    from coordinator.pool import PiecePool

    root = Path(args.dir)
    if (root / "pool" / "index.sqlite").exists():
        root = root / "pool"
    if not (root / "index.sqlite").exists():
        print(f"error: {args.dir} is neither a pool nor a run directory holding one (no index.sqlite)",
              file=sys.stderr)
        return 2
    try:
        with PiecePool(root) as pool:
            if getattr(args, "repair", False):
                for path in pool.remove_leftovers():
                    print(f"removed {path}")
            problems = pool.verify()
            n = pool.count()
            seeds = ", ".join(s.seed_id for s in pool.seeds())
            contributors = len(pool.contributors())
    except sqlite3.OperationalError as err:  # a read-only folder, a locked or unreachable file
        print(f"error: cannot open the pool at {root}: {err}; verify needs write access to the folder (its lock "
              f"and SQLite's journal)", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as err:
        print(f"error: {root / 'index.sqlite'} cannot be read as a pool index ({err}); restore it from a backup, "
              f"or move the folder aside and share again", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot open the pool at {root}: {err.strerror or err}"
              f"{' (' + str(err.filename) + ')' if err.filename else ''}; verify needs write access to the folder "
              f"(its lock and SQLite's journal)", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) among {n} pieces ({seeds})")
        return 1
    print(f"ok: {n} pieces from {contributors} contributors verified ({seeds})")
    return 0


def _add_seeds(sub) -> None:
    from catalog_build.settings import SeedTraining

    p = sub.add_parser("seeds", help="build the seed catalog (seeds and their explained styles)")
    ssub = p.add_subparsers(dest="seeds_command", required=True)
    b = ssub.add_parser("build", help="train seeds from labeled data, or merge them from pool clusters, and "
                                      "explain each in attribute words; rerun with the same settings to resume",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--data", default="styleqa",
                   help="'styleqa' (or a styleqa folder): one seed per style; a personal-data JSONL file: one seed "
                        "per --label-by group. With --from-pool it only supplies the probe prompts")
    b.add_argument("--label-by", default="user", choices=["user"], help="how a JSONL file is grouped into seeds")
    b.add_argument("--from-pool", default=None, metavar="POOL",
                   help="a piece pool (or a run folder holding one): one seed per cluster of its contributors, the "
                        "exact mean of their LoRA updates")
    b.add_argument("--clusters", type=int, default=None, help="seeds to make with --from-pool")
    b.add_argument("--min-contributors", type=int, default=5,
                   help="with --from-pool: the fewest contributors a seed may merge; a smaller cluster refuses the "
                        "build, so that no seed publishes one contributor's update")
    b.add_argument("--out", default="runs/catalog", help="catalog folder (catalog.json, build.json, seeds/)")
    b.add_argument("--styles", default="1,2,3,4,5,6,7,8", help="styleqa styles to make seeds of")
    b.add_argument("--rows", type=int, default=64, help="training rows per seed (a JSONL group's first ones)")
    b.add_argument("--probes", type=int, default=16,
                   help="probe prompts the seeds and the base answer (more on a rerun: only the new ones are answered)")
    b.add_argument("--words", type=int, default=8,
                   help="the first N of the 16 style words (protocols.explanations.STYLE_WORDS: expert, "
                        "elementary, concise, informative, friendly, formal, neutral, humorous, …)")
    b.add_argument("--basis", choices=["text", "model"], default="text",
                   help="attribute directions from hand-written exemplars (text) or from the base answering "
                        "'Answer in a <word> style.' (model: (N+1)·probes generations)")
    b.add_argument("--propose-words", type=int, default=0,
                   help="more attribute words, proposed by the base from each seed's answers against its own "
                        "(needs --basis model)")
    b.add_argument("--corpus-words", action="store_true",
                   help="one more attribute per seed's label (styleqa: e.g. expert-concise-friendly; a JSONL file: "
                        "the user), embedded from the seed's training answers against the base's answers to the "
                        "same inputs, the difference a device computes on its own data")
    b.add_argument("--no-retrain-misread", action="store_true",
                   help="with --corpus-words, a seed that reads most as another seed's label is trained again with "
                        "LoRA on all seven projections (attention and MLP) for twice the steps, and the version that "
                        "reads more as its own label is kept; this turns that off")
    b.add_argument("--min-probe-words", type=int, default=0,
                   help="explain from the probes whose base answer has at least this many words only (short-answer "
                        "tasks show length more than style; 0: every probe)")
    b.add_argument("--basis-probes", type=int, default=16,
                   help="probes the model basis answers in each word's style (the first N)")
    b.add_argument("--unscaled", action="store_true",
                   help="fit explanations in raw embedding units rather than in units of the per-dimension noise "
                        "the seeds' probe answers show")
    b.add_argument("--max-new-tokens", type=int, default=256,
                   help="answer length of the probe answers; devices answer their own inputs this long. MiniLM "
                        "reads 256 word pieces, and shorter answers hide how long and how detailed a style is")
    b.add_argument("--seed-model", default=None,
                   help=f"the base: {DEFAULT_SEED}, {TINY}, a local HF folder or a hub id (default: {DEFAULT_SEED}; "
                        f"with --from-pool, the seed of the pool's pieces)")
    add_settings_flags(b, SeedTraining)
    b.set_defaults(func=cmd_seeds_build)
    c = ssub.add_parser("bench", help="XPerT's seed choice against exhaustive search and successive halving: "
                                      "accuracy, cost against catalog size, fine-tuning from the selected seed vs. "
                                      "the base, and assembling from its pool vs. the base's",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--catalog", default="runs/catalog", help="a styleqa catalog (`bouquet seeds build`)")
    c.add_argument("--out", default="runs/seeds-bench", help="run directory; rerun with the same settings to resume")
    c.add_argument("--users-per-style", type=int, default=3, help="users per style XPerT chooses for")
    c.add_argument("--search-users-per-style", type=int, default=1,
                   help="of those, users per style that also run exhaustive search and successive halving (each "
                        "loads every seed)")
    c.add_argument("--history", type=int, default=16)
    c.add_argument("--test", type=int, default=6, help="held-out items per user (fine-tuning and pool comparisons)")
    c.add_argument("--ft-steps", type=int, default=30)
    c.add_argument("--styles-for-tuning", type=int, default=4,
                   help="the first N styles of the catalog in the fine-tuning and pool comparisons")
    c.add_argument("--parts", default="accuracy,scaling,tuning,pools")
    c.set_defaults(func=cmd_seeds_bench)


def cmd_seeds_bench(args) -> int:
    from simulation.seeds_bench import PARTS, SeedBenchSettings, run_seed_bench

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = SeedBenchSettings(users_per_style=args.users_per_style,
                                 search_users_per_style=args.search_users_per_style, history=args.history, test=args.test,
                                 ft_steps=args.ft_steps, styles_for_tuning=args.styles_for_tuning)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown --parts {', '.join(unknown)}: choose among {', '.join(PARTS)}")
    run_seed_bench(args.catalog, args.out, settings, parts)
    print((Path(args.out) / "report.md").read_text())
    return 0


def cmd_seeds_build(args) -> int:
    import catalog_build as cb
    from catalog_build.settings import SeedTraining
    from protocols.explanations import STYLE_WORDS

    model = args.seed_model or DEFAULT_SEED  # with --from-pool and no model: the pool's seed, local as a rule
    if model.startswith(EMBEDDED_PREFIX) or model == TINY or Path(model).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a hub
    if not 1 <= args.words <= len(STYLE_WORDS):
        raise ValueError(f"--words must be between 1 and {len(STYLE_WORDS)}, got {args.words}")
    explain = cb.ExplainSettings(words=STYLE_WORDS[: args.words], basis=args.basis, propose_words=args.propose_words,
                                 basis_probes=args.basis_probes, scaled=not args.unscaled,
                                 min_probe_words=args.min_probe_words,
                                 corpus=args.corpus_words)
    common = dict(explain=explain, max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    if args.from_pool:
        if args.clusters is None:
            raise ValueError("--from-pool needs --clusters K, the number of seeds to make")
        probes = _probe_prompts(args, avoid=set())
        catalog = cb.build_catalog_from_pool(args.out, args.from_pool, args.seed_model, args.clusters,
                                             probes=probes, random_seed=args.rng_seed,
                                             min_contributors=args.min_contributors, **common)
    else:
        if args.clusters is not None:
            raise ValueError("--clusters only applies with --from-pool")
        groups, built_from, labels = _labeled_groups(args)
        probes = _probe_prompts(args, avoid={r.input for records in groups.values() for r in records})
        lora = settings_from(args, SeedTraining).lora()
        catalog = cb.build_catalog_from_labels(args.out, groups, args.seed_model or DEFAULT_SEED, lora, probes,
                                               built_from=built_from, labels=labels,
                                               retrain_misread=not args.no_retrain_misread, **common)
    print("\n".join(format_catalog(catalog)))
    print(f"built in {time.perf_counter() - start:.0f} s")
    return 0


def _is_jsonl(data: str) -> bool:
    return data not in ("styleqa",) and Path(data).is_file()


def _labeled_groups(args) -> tuple[dict, dict[str, str], dict[str, str]]:
    """Records per seed name, what each seed is built from, and its label in words (styleqa: its attributes;
    a JSONL user: the user), for styleqa styles or JSONL users."""
    import re

    from protocols.records import group_by_user, load_records
    from simulation.styleqa import labeled_seeds, parse_styles

    if args.rows < 1:
        raise ValueError(f"--rows must be at least 1, got {args.rows}")
    if args.data != "styleqa" and not Path(args.data).exists():
        raise ValueError(f"--data {args.data!r} is neither 'styleqa', a styleqa folder nor a JSONL file")
    if not _is_jsonl(args.data):
        return labeled_seeds(args.rows, parse_styles(args.styles), None if args.data == "styleqa" else Path(args.data))
    groups, built_from = {}, {}
    for user, records in group_by_user(load_records(args.data)).items():
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", user).strip("-.") or "user"
        if name in groups:
            raise ValueError(f"users {user!r} and another both become the seed name {name!r}; rename one in "
                             f"{args.data}")
        groups[name] = records[: args.rows]
        built_from[name] = f"user {user} of {Path(args.data).name}, {len(groups[name])} rows"
    return groups, built_from, {name: name for name in groups}


def _probe_prompts(args, avoid: set[str]) -> list[str]:
    """styleqa: unused test questions; a JSONL file: its inputs that no seed trains on, in file order."""
    from protocols.records import load_records
    from simulation.styleqa import styleqa_probes

    if args.probes < 1:
        raise ValueError(f"--probes must be at least 1, got {args.probes}")
    if not _is_jsonl(args.data):
        return styleqa_probes(args.probes, None if args.data == "styleqa" else Path(args.data), avoid)
    probes = list(dict.fromkeys(r.input for r in load_records(args.data) if r.input not in avoid))
    if not probes:
        raise ValueError(f"every input of {args.data} trains a seed, none is left as a probe prompt; lower --rows")
    if len(probes) < args.probes:
        print(f"note: {args.data} leaves only {len(probes)} inputs unused by training; using them as probes",
              file=sys.stderr)
    return probes[: args.probes]


def _add_catalog(sub) -> None:
    p = sub.add_parser("catalog", help="show a seed catalog: its base, attribute words and each seed's explanation")
    p.add_argument("dir", nargs="?", default="runs/catalog", help="catalog folder (default %(default)s)")
    p.set_defaults(func=cmd_catalog)


def cmd_catalog(args) -> int:
    from protocols.catalog import load_catalog

    print("\n".join(format_catalog(load_catalog(args.dir))))
    return 0


def format_catalog(catalog) -> list[str]:
    """The catalog in lines a person reads: base, words, then one line per seed with its explanation."""
    from protocols.explanations import describe

    lines = [f"catalog {catalog.folder}",
             f"base: {catalog.base} ({catalog.base_hash[:12]})",
             f"probes: {len(catalog.probes)}, answers of up to {catalog.max_new_tokens} new tokens",
             f"attribute words ({len(catalog.words)}): {', '.join(catalog.words)}",
             "fitted in units of the noise the probes show" if catalog.basis.scale is not None else
             "fitted in raw embedding units",
             f"seeds ({len(catalog.entries)}):"]
    if not catalog.entries:
        lines.append("  none yet")
    name_w = max((len(e.name) for e in catalog.entries), default=0)
    from_w = max((len(e.built_from) for e in catalog.entries), default=0)
    for e in catalog.entries:
        said = describe(e.explanation) if e.explanation.coefficients or e.explanation.residual else \
            "answers the probes as the base does (nothing to explain)"
        lines.append(f"  {e.name:<{name_w}}  {e.built_from:<{from_w}}  {e.content_hash[:12]}  "
                     f"{_size(e.delta_bytes):>9}  {said}")
    return lines


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bouquet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    _add_bench(sub)
    _add_privacy_audit(sub)
    _add_data(sub)
    _add_pool(sub)
    _add_seeds(sub)
    _add_catalog(sub)
    from simulation.cli_deploy import add_coordinator, add_device
    add_coordinator(sub), add_device(sub)
    from simulation.stream_bench.cli import add_stream_bench
    add_stream_bench(sub)
    from simulation.trainers_bench import add_command as add_trainers
    add_trainers(sub)
    t = sub.add_parser("throughput", add_help=False,
                       help="bouquet's training and assembly loops against bare loops, in tokens/s "
                            "(`bouquet throughput --help`)")
    t.set_defaults(func=None)
    args, rest = parser.parse_known_args(argv)
    if args.command == "throughput":
        from simulation.throughput import main as throughput

        return throughput(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
