"""The `bouquet` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from protocols.seeds import DEFAULT_SEED, EMBEDDED_PREFIX, TINY
from simulation.bench_settings import PRESETS, SWEEPS, BenchSettings


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="run sharers and newcomers as a Flower simulation on real per-user data",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="healthtweets",
                   help="'healthtweets', 'styleqa' (or a styleqa folder), or a personal-data JSONL file")
    p.add_argument("--out", default="runs/simulate", help="run directory (pool, adapters, metrics.json)")
    p.add_argument("--seed-model", default=DEFAULT_SEED,
                   help=f"seed: {DEFAULT_SEED}, {TINY}, a local HF folder or a hub id")
    p.add_argument("--catalog", default="", help="a seed catalog folder (`bouquet seeds build`): every participant "
                   "first picks its seed from the explanations, and pieces are pooled per seed")
    p.add_argument("--max-seed-distance", type=float, default=0.0,
                   help="with --catalog: keep the base when the nearest seed's mix of attributes is farther "
                        "(L1 between shares, 0..2); 0 = always the nearest")
    p.add_argument("--users", type=int, default=None, help="virtual participants (default: all users of the data)")
    p.add_argument("--sharers", type=int, default=4)
    p.add_argument("--newcomers", type=int, default=2)
    p.add_argument("--selection", default="diverse", choices=["random", "most-active", "diverse"])
    p.add_argument("--history", type=int, default=16, help="history items per participant")
    p.add_argument("--test", type=int, default=16, help="held-out items per participant")
    p.add_argument("--steps", type=int, default=30, help="private LoRA steps per sharer")
    p.add_argument("--gate-steps", type=int, default=30)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=96, help="tokens per training sequence")
    p.add_argument("--rho", type=float, default=1.0, help="share ratio: fraction of its pieces a sharer shares")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--shortlist", type=int, default=6, help="pieces per position a newcomer downloads")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--no-generate", action="store_true", help="skip greedy generation (no ROUGE)")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--gpus-per-client", type=float, default=0.0)
    p.add_argument("--ray-address", default=None, help="join a running Ray cluster instead of starting one")
    p.add_argument("--prepare-only", action="store_true",
                   help="only write the virtual devices under OUT/devices (e.g. for `flwr run`), then stop")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args) -> int:
    from coordinator.config import RunSettings
    from simulation.datasets import load_users
    from simulation.federation import run_federation
    from simulation.summary import print_summary

    if args.seed_model.startswith(EMBEDDED_PREFIX) or args.seed_model == TINY or Path(args.seed_model).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a hub
    wanted = args.sharers + args.newcomers
    users = load_users(args.data, history_size=args.history, test_size=args.test, max_users=args.users,
                       seed=args.random_seed)
    if len(users) < wanted:
        print(f"error: {args.data} gives {len(users)} users with {args.history}+{args.test} items, but "
              f"{args.sharers} sharers + {args.newcomers} newcomers need {wanted}; lower --sharers/--newcomers "
              f"or --history/--test", file=sys.stderr)
        return 2
    out = Path(args.out)
    if (out / "metrics.json").exists() or (out / "pool").exists():
        print(f"error: {out} already holds a run; choose another --out or remove it", file=sys.stderr)
        return 2
    if args.prepare_only:
        from simulation.federation import prepare_devices

        prepare_devices(users, out)
        print(f"{len(users)} devices written to {out / 'devices'}")
        return 0
    if args.catalog:
        from protocols.catalog import load_catalog

        try:
            catalog = load_catalog(args.catalog)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.seed_model != catalog.base:
            print(f"error: the catalog at {args.catalog} is built on {catalog.base!r}; run with --seed-model "
                  f"{catalog.base}", file=sys.stderr)
            return 2
    settings = RunSettings(seed=args.seed_model, catalog=str(Path(args.catalog).resolve()) if args.catalog else "",
                           max_seed_distance=args.max_seed_distance, out_dir=str(out), num_sharers=args.sharers,
                           num_newcomers=args.newcomers, sharer_selection=args.selection, lora_rank=args.rank,
                           lora_alpha=args.alpha, lora_steps=args.steps, lora_lr=args.lr,
                           gate_steps=args.gate_steps, batch_size=args.batch_size, max_len=args.max_len,
                           share_ratio=args.rho, top_k=args.top_k, temperature=args.temperature,
                           shortlist=max(args.shortlist, args.top_k), max_new_tokens=args.max_new_tokens,
                           generate=not args.no_generate, seed_number=args.random_seed, timeout=3600.0,
                           min_nodes=len(users))
    start = time.perf_counter()
    metrics = run_federation(users, settings, cpus_per_client=args.cpus_per_client,
                             gpus_per_client=args.gpus_per_client, ray_address=args.ray_address)
    metrics["wall_seconds"] = time.perf_counter() - start
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print_summary(metrics, out)
    return 0


def _add_bench(sub) -> None:
    d = BenchSettings()
    p = sub.add_parser("bench", help="compare Per-Pcs with its baselines (seed, OPPU, retrieval, random pieces, "
                                     "Per-Pcs + fine-tune) on held-out data, in one process")
    p.add_argument("--out", default="runs/bench", help="run directory; rerun with the same settings to resume "
                                                         "(default %(default)s)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="defaults sized for 2 CPU cores and SmolLM2 (under 30 min); explicit flags override them")

    def opt(flag: str, type_, text: str, default=None) -> None:
        shown = getattr(d, flag[2:].replace("-", "_")) if default is None else default
        p.add_argument(flag, type=type_, default=None, help=f"{text} (default {shown}, or the preset's)")

    opt("--data", str, "'healthtweets', 'styleqa' (or a styleqa folder), or a personal-data JSONL file")
    opt("--seed-model", str, f"seed: {DEFAULT_SEED}, {TINY}, a local HF folder or a hub id")
    opt("--sharers", int, "users who train, cut and share pieces")
    opt("--targets", int, "users who get every method and are evaluated (disjoint from the sharers)")
    opt("--history", int, "history items per user")
    opt("--test", int, "held-out items per user")
    opt("--steps", int, "private LoRA steps (sharers and oppu)")
    opt("--gate-steps", int, "gate training steps per sharer")
    opt("--ft-steps", int, "fine-tune steps of perpcs+ft", default="steps // 4")
    opt("--rank", int, "LoRA rank")
    opt("--alpha", float, "LoRA alpha")
    opt("--lr", float, "LoRA learning rate")
    opt("--gate-lr", float, "gate learning rate")
    opt("--batch-size", int, "training batch size")
    opt("--max-len", int, "tokens per sequence")
    opt("--rho", float, "share ratio: fraction of its pieces a sharer shares")
    opt("--top-k", int, "pieces mixed per position")
    opt("--temperature", float, "softmax temperature of the mix")
    opt("--shortlist", int, "pieces per position a target downloads after scoring gates")
    opt("--max-new-tokens", int, "greedy generation length")
    opt("--random-seed", int, "seed of the user split, the shares and the training")
    opt("--catalog", str, "a seed catalog folder (`bouquet seeds build`, built on --seed-model): every sharer and "
        "target first picks its seed on its own history, and each target's methods run on its seed", default="none")
    p.add_argument("--sweep", default=None, help=f"comma-separated subset of {','.join(SWEEPS)}: perpcs perplexity "
                                                 f"as each changes (default none)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from dataclasses import fields

    from simulation.bench import run_bench
    from simulation.bench_report import markdown_table
    from simulation.bench_settings import resolve_settings

    flags = {f.name: getattr(args, f.name) for f in fields(BenchSettings) if f.name != "sweep"}
    if args.sweep is not None:
        flags["sweep"] = tuple(name.strip() for name in args.sweep.split(",") if name.strip())
    settings = resolve_settings(args.preset, **flags)
    model = settings.seed_model
    if model.startswith(EMBEDDED_PREFIX) or model == TINY or Path(model).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a hub
    report = run_bench(settings, args.out)
    print(markdown_table(report))
    for t in report["targets"]:
        print(f"{'not measured' if t['met'] is None else 'met' if t['met'] else 'not met'}: {t['target']} "
              f"({t['evidence']})")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _add_pool(sub) -> None:
    p = sub.add_parser("pool", help="inspect a piece pool")
    psub = p.add_subparsers(dest="pool_command", required=True)
    v = psub.add_parser("verify", help="check every stored piece: digest, signature, seed")
    v.add_argument("dir", help="a run directory or a pool directory")
    v.set_defaults(func=cmd_pool_verify)


def cmd_pool_verify(args) -> int:
    from coordinator.pool import PiecePool

    root = Path(args.dir)
    if (root / "pool" / "index.sqlite").exists():
        root = root / "pool"
    if not (root / "index.sqlite").exists():
        print(f"error: {args.dir} is neither a pool nor a run directory holding one (no index.sqlite)",
              file=sys.stderr)
        return 2
    with PiecePool(root) as pool:
        problems = pool.verify()
        n = pool.count()
        for line in problems:
            print(line)
        seeds = ", ".join(s.seed_id for s in pool.seeds())
        if problems:
            print(f"{len(problems)} problem(s) among {n} pieces ({seeds})")
            return 1
        print(f"ok: {n} pieces from {len(pool.contributors())} contributors verified ({seeds})")
    return 0


def _add_seeds(sub) -> None:
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
    b.add_argument("--out", default="runs/catalog", help="catalog folder (catalog.json, build.json, seeds/)")
    b.add_argument("--styles", default="1,2,3,4,5,6,7,8", help="styleqa styles to make seeds of")
    b.add_argument("--rows", type=int, default=64, help="training rows per seed (a JSONL group's first ones)")
    b.add_argument("--steps", type=int, default=40, help="LoRA steps per seed")
    b.add_argument("--rank", type=int, default=8)
    b.add_argument("--alpha", type=float, default=16.0)
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--batch-size", type=int, default=4)
    b.add_argument("--max-len", type=int, default=128, help="tokens per training sequence")
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
    b.add_argument("--random-seed", type=int, default=0, help="seed of LoRA training and of the clustering")
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
    from simulation.seed_bench import SeedBenchSettings, run_seed_bench

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = SeedBenchSettings(users_per_style=args.users_per_style,
                                 search_users_per_style=args.search_users_per_style, history=args.history, test=args.test,
                                 ft_steps=args.ft_steps, styles_for_tuning=args.styles_for_tuning)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = sorted(set(parts) - {"accuracy", "scaling", "tuning", "pools"})
    if unknown:
        raise ValueError(f"unknown --parts {', '.join(unknown)}: choose among accuracy, scaling, tuning, pools")
    run_seed_bench(args.catalog, args.out, settings, parts)
    print((Path(args.out) / "report.md").read_text())
    return 0


def cmd_seeds_build(args) -> int:
    from participants.lora_training import LoraSettings
    from protocols.explanations import STYLE_WORDS
    from simulation import seed_building as sb

    model = args.seed_model or DEFAULT_SEED  # with --from-pool and no model: the pool's seed, local as a rule
    if model.startswith(EMBEDDED_PREFIX) or model == TINY or Path(model).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a hub
    if not 1 <= args.words <= len(STYLE_WORDS):
        raise ValueError(f"--words must be between 1 and {len(STYLE_WORDS)}, got {args.words}")
    explain = sb.ExplainSettings(words=STYLE_WORDS[: args.words], basis=args.basis, propose_words=args.propose_words,
                                 basis_probes=args.basis_probes, scaled=not args.unscaled,
                                 min_probe_words=args.min_probe_words,
                                 corpus=args.corpus_words)
    common = dict(explain=explain, max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    if args.from_pool:
        if args.clusters is None:
            raise ValueError("--from-pool needs --clusters K, the number of seeds to make")
        probes = _probe_prompts(args, avoid=set())
        catalog = sb.build_catalog_from_pool(args.out, args.from_pool, args.seed_model, args.clusters,
                                             probes=probes, random_seed=args.random_seed, **common)
    else:
        if args.clusters is not None:
            raise ValueError("--clusters only applies with --from-pool")
        groups, built_from, labels = _labeled_groups(args)
        probes = _probe_prompts(args, avoid={r.input for records in groups.values() for r in records})
        lora = LoraSettings(rank=args.rank, alpha=args.alpha, steps=args.steps, lr=args.lr,
                            batch_size=args.batch_size, max_len=args.max_len, seed=args.random_seed)
        catalog = sb.build_catalog_from_labels(args.out, groups, args.seed_model or DEFAULT_SEED, lora, probes,
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
    from simulation.seed_building import STYLEQA_LABELS, styleqa_groups

    if args.rows < 1:
        raise ValueError(f"--rows must be at least 1, got {args.rows}")
    if args.data != "styleqa" and not Path(args.data).exists():
        raise ValueError(f"--data {args.data!r} is neither 'styleqa', a styleqa folder nor a JSONL file")
    if not _is_jsonl(args.data):
        folder = None if args.data == "styleqa" else Path(args.data)
        try:
            styles = [int(s) for s in args.styles.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--styles takes comma-separated style numbers 1..8, got {args.styles!r}") from None
        if not styles or any(not 1 <= s <= 8 for s in styles):
            raise ValueError(f"--styles takes style numbers 1..8 (0 is the unstylized reference), got {args.styles!r}")
        groups = styleqa_groups(args.rows, styles, folder)
        return groups, {f"style{s}": f"styleqa style {s}, {args.rows} rows" for s in styles}, \
            {f"style{s}": STYLEQA_LABELS[s] for s in styles}
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
    from simulation.seed_building import styleqa_probes

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
    _add_pool(sub)
    _add_seeds(sub)
    _add_catalog(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
