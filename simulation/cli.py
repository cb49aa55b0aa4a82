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
    settings = RunSettings(seed=args.seed_model, out_dir=str(out), num_sharers=args.sharers,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bouquet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    _add_bench(sub)
    _add_pool(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
