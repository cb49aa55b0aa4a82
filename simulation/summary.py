"""The table `bouquet simulate` prints at the end of a run, from the run's summary.json (simulation.federation's
`summarize`: the coordinator's report, whose nodes are node ids and key ids, joined with the virtual devices'
users by the harness)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def print_summary(metrics: dict, run_dir: Path, console: Console | None = None) -> None:
    """`metrics`: the run's summary (summary.json), not the coordinator's metrics.json."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough that no column is cut
            console = Console(width=160)
    if metrics.get("selections"):
        chosen = Table(title="seed choice on each device (XPerT)")
        for col in ("user", "seed", "mix L1", "s", "why"):
            chosen.add_column(col)
        for user, m in sorted(metrics["selections"].items()):
            chosen.add_row(user, m["seed"], f"{m['distance']:.2f}", f"{m.get('selection-seconds', 0):.1f}",
                           m["reason"].split("; nearest")[0].removeprefix("your data reads as: "))
        console.print(chosen)
    sharers = Table(title="sharers")
    for col in ("user", "LoRA loss", "LoRA s", "gate s", "shared", "accepted", "DP-SGD ε"):
        sharers.add_column(col)
    for user, m in metrics["sharers"].items():
        epsilon = f"{m['pieces-epsilon']:.2f}" if "pieces-epsilon" in m else "none"
        sharers.add_row(user, f"{m['lora-loss-first']:.2f} → {m['lora-loss-last']:.2f}", f"{m['lora-seconds']:.1f}",
                        f"{m['gate-seconds']:.1f}", str(int(m["pieces-shared"])), str(int(m["accepted"])), epsilon)
    console.print(sharers)

    rows = metrics["newcomers"]
    table = Table(title="newcomers: held-out perplexity and ROUGE, bare seed vs. assembled adapter")
    cols = [("history", "history-size", "{:.0f}"), ("ppl seed", "seed-perplexity", "{:.2f}"),
            ("ppl assembled", "assembled-perplexity", "{:.2f}"), ("R-1 seed", "seed-rouge1", "{:.3f}"),
            ("R-1 assembled", "assembled-rouge1", "{:.3f}"), ("R-L seed", "seed-rougeL", "{:.3f}"),
            ("R-L assembled", "assembled-rougeL", "{:.3f}"), ("assembly s", "assembly-seconds", "{:.1f}")]
    table.add_column("user")
    for title, _, _ in cols:
        table.add_column(title, justify="right")
    for r in rows:
        table.add_row(r["user"], *[fmt.format(r[key]) if key in r else "–" for _, key, fmt in cols])
    if rows:
        means = [_mean(rows, key) for _, key, _ in cols]
        table.add_row("mean", *[fmt.format(m) if m is not None else "–" for (_, _, fmt), m in zip(cols, means)],
                      style="bold")
    console.print(table)
    for line in metrics.get("refused", []):
        console.print(f"[yellow]refused[/]: {line}")
    for line in metrics.get("unanswered", []):
        console.print(f"[yellow]no answer[/]: {line}")
    if len(metrics.get("pool_by_seed", {})) > 1:
        console.print("pool per seed: " + ", ".join(f"{Path(k).name}: {v}" for k, v in metrics["pool_by_seed"].items()))
    console.print(f"pool: {metrics['pool_pieces']} pieces; adapters in {run_dir / 'adapters'}; "
                  f"wall time {metrics.get('wall_seconds', 0):.0f} s")
