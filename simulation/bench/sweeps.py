"""Sweeps: Per-Pcs with one setting changed at a time (share ratio, top-k, sharers, history, mix scale), perplexity
only."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from participants.evaluation import perplexity
from simulation.bench.methods import Bench, perpcs
from simulation.bench.settings import BenchSettings
from simulation.user_data import UserData


def _doublings(limit: int) -> list[int]:
    return sorted({2 ** i for i in range(limit.bit_length()) if 2 ** i < limit} | {limit})


def sweep_values(name: str, s: BenchSettings) -> list:
    # share ratios beyond what the sharers' policy sends would repeat its cap: --max-share-ratio 1 to see them
    ratios = sorted({r for r in (0.25, 0.5, 0.75, 1.0) if r <= s.max_share_ratio} | {s.max_share_ratio})
    return {"share-ratio": ratios, "top-k": sorted(set(_doublings(s.sharers)) | {s.top_k}),
            "sharers": _doublings(s.sharers), "history": _doublings(s.history),
            "mix-scale": sorted({0.5, 1.0, 1.5, 2.0, s.mix_scale})}[name]


def sweep_point(b: Bench, name: str, value, targets: list[UserData]) -> dict:
    """Per-Pcs with one setting changed, perplexity only, averaged over the targets."""
    s = {"top-k": lambda: replace(b.s, top_k=value, shortlist=max(b.s.shortlist, value)),
         "mix-scale": lambda: replace(b.s, mix_scale=value)}.get(name, lambda: b.s)()
    candidates = b.shared(value if name == "sharers" else len(b.sharers),
                          value if name == "share-ratio" else b.s.share_ratio)
    per_target, tokens, downloaded = {}, [], []
    for t in targets:
        history = t.history[:value] if name == "history" else t.history
        outcome, _ = perpcs(b.seed, history, candidates, s)
        per_target[t.user] = perplexity(b.seed, t.test, outcome.adapter, max_len=b.s.max_len)
        tokens.append(outcome.tokens_forward)
        downloaded.append(outcome.bytes_downloaded)
    return {"kind": "sweep", "sweep": name, "value": value, "perplexity": float(np.mean(list(per_target.values()))),
            "per_target": per_target, "pool_pieces": len(candidates), "tokens_forward": float(np.mean(tokens)),
            "bytes_downloaded": float(np.mean(downloaded))}
