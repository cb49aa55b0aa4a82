"""`bouquet stream-bench`: its flags (from StreamBenchSettings) and what it prints."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path


def add_stream_bench(sub) -> None:
    from simulation.cli import add_settings_flags
    from simulation.stream_bench.settings import PRESETS, StreamBenchSettings

    p = sub.add_parser("stream-bench", help="a device learning from its stream: held-out perplexity and ROUGE-1 "
                                            "against buffer size per selection rule (sdss, fifo, random, kcenter), "
                                            "with and without synthesis; scoring cost; buffer memory")
    p.add_argument("--out", default="runs/stream-bench", help="run directory; rerun with the same settings to "
                                                                "resume (default %(default)s)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="small: a smoke test on 2 CPU cores (about 20 minutes); medium: the first measurement "
                        "on 2 CPU cores (about 35 minutes, 16 users); full: the issue's sizes")
    add_settings_flags(p, StreamBenchSettings, skip=("generate", "gate_steps", "gate_lr", "share_ratio", "top_k",
                                                     "temperature", "shortlist", "assembly_batch_size",
                                                     "max_seed_distance"), preset=True)
    p.set_defaults(func=cmd_stream_bench)


def cmd_stream_bench(args) -> int:
    from simulation.stream_bench import StreamBenchSettings, resolve_settings, run_stream_bench

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = resolve_settings(args.preset, **{f.name: getattr(args, f.name) for f in fields(StreamBenchSettings)
                                         if hasattr(args, f.name)})
    report = run_stream_bench(s, args.out)
    print((Path(args.out) / "report.md").read_text())
    return 0 if report else 1
