"""`bouquet trainers`: AdamW against zeroth-order training, and the base's precisions, on the same users.

    bouquet trainers [--data healthtweets|styleqa] [--users N] [--points P] [--out DIR] [run settings …]

Parts, all on the same users, batch and length, in one run:
  memory      peak memory of inference, AdamW LoRA training and zeroth-order training, each in a process of its
              own (simulation.trainer_memory): process RSS and the bytes of live tensors, beside
              participants.trainer_choice's estimate (what `trainer auto` decides on)
  throughput  the zeroth-order trainer's forward passes per second against a bare no-grad forward loop on the
              same batches (the cost of perturbing), alternating, median of the repeats
  quality     per user, held-out perplexity along the way for AdamW (lora-steps) and zeroth-order
              (lora-steps × zo-step-factor), against steps and against training time (evaluation not counted);
              the share of AdamW's gain zeroth-order reaches at 1× and 10× AdamW's time, paired over the users
  precision   where the hardware has bf16 arithmetic: a forward pass and a LoRA step in fp32 and bf16, and the
              held-out perplexity after AdamW training both ways
Writes report.json, report.md and plots (held-out perplexity vs steps and vs seconds) into --out.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path

import numpy as np

from protocols.settings import ParticipantSettings, check, setting
from simulation.settings import UserSettings


PARTS = ("memory", "throughput", "quality", "precision")


@dataclass(frozen=True)
class TrainersBenchSettings(ParticipantSettings, UserSettings):
    users: int = setting(4, "users compared (the first of the data, the same for both trainers)", low=1)
    points: int = setting(6, "held-out evaluations along each training run", low=2)
    repeats: int = setting(3, "alternating runs of the throughput part", low=1)
    precision_users: int = setting(2, "users the precision part trains on both ways", low=1)
    parts: tuple[str, ...] = setting(PARTS, f"comma-separated subset of {','.join(PARTS)}")

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))
        unknown = sorted(set(self.parts) - set(PARTS))
        check(self, unknown and f"unknown parts {', '.join(unknown)}: choose among {', '.join(PARTS)}")


def paired(xs: list[float], ys: list[float], rng_seed: int = 0) -> dict:
    """Mean of x - y over pairs, its bootstrap 95% interval, and a two-sided sign-flip permutation p-value."""
    d = np.asarray(xs, float) - np.asarray(ys, float)
    rng = np.random.default_rng(rng_seed)
    boots = [rng.choice(d, len(d)).mean() for _ in range(2000)]
    flips = rng.choice([-1.0, 1.0], size=(4000, len(d)))
    p = float((np.abs((flips * d).mean(1)) >= abs(d.mean()) - 1e-12).mean())
    return {"mean": float(d.mean()), "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "p": p, "n": len(d)}


# --- memory ---------------------------------------------------------------------------------------------------


def memory_part(s: TrainersBenchSettings, records_path: Path, seed) -> dict:
    from participants.lora_training import DEFAULT_TARGETS
    from participants.trainer_choice import MIB, estimate_memory

    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = {}
    for mode in ("inference", "adamw", "zeroth-order"):
        cmd = [sys.executable, "-m", "simulation.trainer_memory", mode, "--seed-model", s.seed_model,
               "--precision", s.precision, "--records", str(records_path), "--batch-size", str(s.batch_size),
               "--max-len", str(s.max_len), "--rank", str(s.lora_rank)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe {mode} failed: {done.stderr[-2000:]}")
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    est = estimate_memory(seed, DEFAULT_TARGETS, s.lora_rank, s.batch_size, s.max_len)
    for mode, key in (("inference", "inference"), ("adamw", "adamw"), ("zeroth-order", "zeroth_order")):
        out[mode]["estimate_mib"] = getattr(est, key) / MIB
    inf = out["inference"]
    for mode in ("adamw", "zeroth-order"):
        m = out[mode]
        m["rss_vs_inference"] = m["rss_peak_steps_mib"] / inf["rss_peak_steps_mib"]
        m["live_vs_inference"] = m["live_tensors_mib"] / inf["live_tensors_mib"]
    return out


# --- throughput -----------------------------------------------------------------------------------------------


def throughput_part(s: TrainersBenchSettings, seed, records) -> dict:
    """Forward passes per second: the zeroth-order trainer's, and a bare no-grad loop's computing the same loss over
    the same batches."""
    import torch

    from participants.chat_data import answer_loss, encode_all, endless_batches
    from participants.settings import lora_settings
    from participants.zeroth_order import train_lora_zeroth_order

    steps = 8
    settings = lora_settings(s, steps=steps, trainer="zeroth-order")
    settings = replace(settings, zeroth_order=replace(settings.zeroth_order, step_factor=1, perturbations=1))
    examples = encode_all(seed.tokenizer, records, s.max_len)
    data = list(islice(endless_batches(examples, s.batch_size, seed.tokenizer.pad_token_id, seed.device,
                                       settings.seed), steps))

    def bare() -> float:
        # the same loss as the trainer's passes (answer positions through the LM head), on the bare seed
        start = time.perf_counter()
        with torch.no_grad():
            for batch in data:
                for _ in range(2):  # a zeroth-order step's two passes on one batch
                    float(answer_loss(seed.model, batch))
        return 2 * steps / (time.perf_counter() - start)

    def trainer() -> float:
        _, report = train_lora_zeroth_order(seed, records, settings, desc="throughput: zeroth-order")
        return report.forward_passes_per_second

    bare()  # warm-up, not counted
    ours, theirs = [], []
    for _ in range(s.repeats):
        ours.append(trainer())
        theirs.append(bare())
    o, b = statistics.median(ours), statistics.median(theirs)
    return {"trainer_passes_per_s": o, "bare_passes_per_s": b, "ratio": o / b, "trainer_runs": ours,
            "bare_runs": theirs}


# --- quality along the way ------------------------------------------------------------------------------------


def _curve(seed, user, settings, points: int, desc: str) -> tuple[list[dict], object]:
    """Train with evaluations at `points` evenly spaced steps; times exclude the evaluations."""
    from participants.adapters import branches
    from participants.evaluation import perplexity
    from participants.lora_training import train_private_lora

    total = settings.steps * (settings.zeroth_order.step_factor if settings.trainer == "zeroth-order" else 1)
    at = {max(1, round(total * k / (points - 1))) for k in range(1, points)}
    clock = {"wall": time.perf_counter(), "cpu": time.process_time(), "paused_wall": 0.0, "paused_cpu": 0.0}
    rows = [{"step": 0, "seconds": 0.0, "cpu_seconds": 0.0,
             "perplexity": perplexity(seed, user.test, max_len=settings.max_len)}]
    clock["wall"], clock["cpu"] = time.perf_counter(), time.process_time()

    def on_step(step, report):
        if step not in at:
            return
        wall, cpu = time.perf_counter(), time.process_time()
        row = {"step": step, "seconds": wall - clock["wall"] - clock["paused_wall"],
               "cpu_seconds": cpu - clock["cpu"] - clock["paused_cpu"], "train_loss": report.losses[-1]}
        # the adapter is in place on the model (PEFT layers or hooks): evaluate as it is
        row["perplexity"] = perplexity(seed, user.test, max_len=settings.max_len)
        rows.append(row)
        clock["paused_wall"] += time.perf_counter() - wall
        clock["paused_cpu"] += time.process_time() - cpu

    weights, report = train_private_lora(seed, user.history, settings, desc=desc, on_step=on_step)
    final = perplexity(seed, user.test, branches(weights, settings.alpha / settings.rank, seed.device),
                       max_len=settings.max_len)
    rows[-1]["perplexity_saved"] = final  # the adapter as returned, evaluated with hooks: must agree
    return rows, report


def _ppl_at(curve: list[dict], seconds: float) -> float:
    """The held-out perplexity of the last adapter evaluated within `seconds` of training (no picking the best:
    the test set chooses nothing)."""
    return [r for r in curve if r["seconds"] <= seconds * (1 + 1e-9)][-1]["perplexity"]


def quality_part(s: TrainersBenchSettings, seed, users, out: Path) -> dict:
    """Both trainers per user; each finished user is kept in quality-partial.json at once (long runs)."""
    from participants.settings import lora_settings

    per_user = {}
    for u in users:
        adamw, _ = _curve(seed, u, lora_settings(s, trainer="adamw"), s.points, f"{u.user}: adamw")
        zo, rep = _curve(seed, u, lora_settings(s, trainer="zeroth-order"), s.points, f"{u.user}: zeroth-order")
        base, best = adamw[0]["perplexity"], adamw[-1]["perplexity"]
        t = adamw[-1]["seconds"]
        gain = base - best
        share = {f"{k}x": ((base - _ppl_at(zo, k * t)) / gain if gain > 0 else None) for k in (1, 10)}
        # a share "within 10×" is only that if zeroth-order trained that long: say how long it did
        per_user[u.user] = {"adamw": adamw, "zeroth_order": zo, "zeroth_order_stopped": rep.stopped,
                            "gain_share": share, "zo_time_ratio": zo[-1]["seconds"] / t if t > 0 else None}
        (out / "quality-partial.json").write_text(json.dumps(per_user, indent=1))
    shares = {k: [v["gain_share"][k] for v in per_user.values() if v["gain_share"][k] is not None]
              for k in ("1x", "10x")}
    summary = {k: {"mean": float(np.mean(v)) if v else None, "users": len(v),
                   **({"vs_0.7": paired(v, [0.7] * len(v))} if len(v) > 1 else {})} for k, v in shares.items()}
    final = {"adamw": [v["adamw"][-1]["perplexity"] for v in per_user.values()],
             "zeroth_order": [v["zeroth_order"][-1]["perplexity"] for v in per_user.values()],
             "base": [v["adamw"][0]["perplexity"] for v in per_user.values()]}
    return {"per_user": per_user, "gain_share": summary, "final": final,
            "zo_minus_adamw_final": paired(final["zeroth_order"], final["adamw"]) if len(users) > 1 else None}


# --- precision --------------------------------------------------------------------------------------------------


def precision_part(s: TrainersBenchSettings, users, records) -> dict:
    """The base in fp32 against bf16 weights (where this hardware does bf16 at all) and int8 weights (where it
    has the kernels): a forward pass, an AdamW LoRA step, and held-out perplexity after training, per precision."""
    import torch

    from participants.adapters import branches
    from participants.chat_data import batches, encode_all
    from participants.evaluation import perplexity
    from participants.int8_weights import int8_supported
    from participants.lora_training import train_private_lora
    from participants.precision import bf16_hardware
    from participants.seed_loading import forget_seed, is_loaded, load_seed, pick_device
    from participants.settings import lora_settings
    from participants.trainer_choice import weight_bytes

    dev = pick_device()
    hw = bf16_hardware(dev)
    users = users[: s.precision_users]
    out: dict = {"hardware": hw.what, "users": [u.user for u in users], "skipped": {}}
    if not hw.native:
        out["skipped"]["bf16"] = hw.what  # says why: "CPU without bf16 arithmetic", "CUDA ... without bf16"
    if int8_supported(dev):
        out["skipped"]["int8"] = int8_supported(dev)
    for precision in [p for p in ("fp32", "bf16", "int8") if p not in out["skipped"]]:
        held = is_loaded(s.seed_model, precision=precision)
        seed = load_seed(s.seed_model, precision=precision)
        examples = encode_all(seed.tokenizer, records, s.max_len)
        batch = max(batches(examples, s.batch_size, seed.tokenizer.pad_token_id, seed.device),
                    key=lambda b: b["input_ids"].numel())
        times = []
        with torch.no_grad():
            for _ in range(4):
                start = time.perf_counter()
                seed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                times.append(time.perf_counter() - start)
        settings = lora_settings(s, trainer="adamw")
        ppl, steps = [], []
        for u in users:
            weights, report = train_private_lora(seed, u.history, settings, desc=f"{u.user}: adamw {precision}")
            steps += list(np.diff(report.step_ends))
            ppl.append(perplexity(seed, u.test, branches(weights, settings.alpha / settings.rank, seed.device),
                                  max_len=s.max_len))
        out[precision] = {"forward_s": statistics.median(times[1:]), "step_s": statistics.median(steps),
                          "weights_mib": weight_bytes(seed.model) / 2**20,
                          "base_perplexity": [perplexity(seed, u.test, max_len=s.max_len) for u in users],
                          "trained_perplexity": ppl}
        if not held:
            forget_seed(s.seed_model, precision=precision)
    f = out["fp32"]
    for precision in ("bf16", "int8"):
        if precision in out:
            o = out[precision]
            o["forward_speedup"] = f["forward_s"] / o["forward_s"]
            o["step_speedup"] = f["step_s"] / o["step_s"]
            o["trained_perplexity_ratio"] = float(np.mean(o["trained_perplexity"]) / np.mean(f["trained_perplexity"]))
            o["minus_fp32"] = paired(o["trained_perplexity"], f["trained_perplexity"]) if len(users) > 1 else None
    return out


# --- report -----------------------------------------------------------------------------------------------------


def plots(quality: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulation.figures import save_figure

    names = []
    for x, label in (("step", "training steps"), ("seconds", "training seconds (evaluation excluded)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (user, v) in enumerate(quality["per_user"].items()):
            for key, style in (("adamw", "-"), ("zeroth_order", "--")):
                curve = v[key]
                ax.plot([r[x] for r in curve], [r["perplexity"] for r in curve], style, marker=".", color=f"C{i}",
                        label=f"{user} {key.replace('_', '-')}")
        ax.set(xlabel=label, ylabel="held-out perplexity", title=f"AdamW (solid) vs zeroth-order (dashed)")
        if x == "step":
            ax.set_xscale("symlog", linthresh=1)
        ax.legend(fontsize=6, ncol=2)
        names.append(save_figure(fig, out / f"heldout_vs_{x}.png"))
    return names


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def _memory_md(m: dict) -> list[str]:
    lines = ["## peak memory (each in its own process)", "",
             "| run | RSS peak during steps MiB | × inference | live tensors MiB | × inference | estimate MiB |",
             "|---|---|---|---|---|---|"]
    for mode in ("inference", "adamw", "zeroth-order"):
        r = m[mode]
        lines.append(f"| {mode} | {r['rss_peak_steps_mib']:.0f} | {_fmt(r.get('rss_vs_inference', 1.0), '.2f')} | "
                     f"{r['live_tensors_mib']:.0f} | {_fmt(r.get('live_vs_inference', 1.0), '.2f')} | "
                     f"{r['estimate_mib']:.0f} |")
    return lines


def _throughput_md(t: dict) -> list[str]:
    return ["## throughput", "", f"zeroth-order trainer {t['trainer_passes_per_s']:.2f} forward passes/s, bare "
            f"no-grad loop {t['bare_passes_per_s']:.2f}: ratio {t['ratio']:.2f} (median of {len(t['bare_runs'])})"]


def _quality_md(q: dict) -> list[str]:
    lines = ["## held-out perplexity", "", "| user | base | adamw (final) | zeroth-order (final) | zo share of "
             "adamw's gain at 1× its time | at 10× | zo's training time ÷ adamw's |", "|---|---|---|---|---|---|---|"]
    for user, v in q["per_user"].items():
        lines.append(f"| {user} | {v['adamw'][0]['perplexity']:.3f} | {v['adamw'][-1]['perplexity']:.3f} | "
                     f"{v['zeroth_order'][-1]['perplexity']:.3f} | {_fmt(v['gain_share']['1x'], '.1%')} | "
                     f"{_fmt(v['gain_share']['10x'], '.1%')} | {_fmt(v.get('zo_time_ratio'), '.1f')} |")
    for k, v in q["gain_share"].items():
        extra = (f"; mean - 0.7 = {v['vs_0.7']['mean']:+.3f}, 95% CI [{v['vs_0.7']['ci95'][0]:+.3f}, "
                 f"{v['vs_0.7']['ci95'][1]:+.3f}], p {v['vs_0.7']['p']:.3f}") if "vs_0.7" in v else ""
        lines.append(f"\nmean share of AdamW's gain within {k} AdamW's time (the last adapter evaluated by "
                     f"then): {_fmt(v['mean'], '.1%')} over {v['users']} users{extra}")
    return lines


def _precision_md(p: dict) -> list[str]:
    lines = ["## precision of the base", "", f"{p['hardware']}; AdamW trained on {len(p['users'])} users", "",
             "| base | weights MiB | forward s | × fp32 speed | LoRA step s | × fp32 speed | held-out ppl after AdamW "
             "| ÷ fp32 |", "|---|---|---|---|---|---|---|---|"]
    for name in ("fp32", "bf16", "int8"):
        if name in p:
            o = p[name]
            lines.append(f"| {name} | {o['weights_mib']:.1f} | {o['forward_s']:.3f} | "
                         f"{_fmt(o.get('forward_speedup', 1.0), '.2f')} | {o['step_s']:.3f} | "
                         f"{_fmt(o.get('step_speedup', 1.0), '.2f')} | {np.mean(o['trained_perplexity']):.3f} | "
                         f"{_fmt(o.get('trained_perplexity_ratio', 1.0), '.4f')} |")
    lines += [f"\nnot measured: {k} ({why})" for k, why in p["skipped"].items()]
    return lines


def markdown(report: dict) -> str:
    st = report["settings"]
    lines = ["# bouquet trainers", "", f"data `{st['data']}` · {report['seed']} · {report['hardware']}  ",
             f"{st['users']} users; batch {st['batch_size']} × max-len {st['max_len']}; lora-steps {st['lora_steps']}"
             f" (AdamW, lr {st['lora_lr']}), zeroth-order {st['lora_steps'] * st['zo_step_factor']} steps (eps "
             f"{st['zo_eps']}, lr {st['zo_lr']}, factors {st['zo_factors']}, {st['zo_perturbations']} direction(s), "
             f"{st['zo_schedule']})"]
    for name, render in (("memory", _memory_md), ("throughput", _throughput_md), ("quality", _quality_md),
                         ("precision", _precision_md)):
        if report.get(name):
            lines += [""] + render(report[name])
    if report["plots"]:
        lines += ["", "Plots: " + ", ".join(f"![{n}]({n})" for n in report["plots"])]
    return "\n".join(lines) + "\n"


def run_trainers_bench(s: TrainersBenchSettings, out: Path) -> dict:
    from participants.precision import describe, resolve_precision
    from participants.seed_loading import load_seed, pick_device
    from protocols.records import save_records
    from simulation.datasets import load_users

    resolve_precision(s.precision, pick_device())  # refused before any work
    everyone = load_users(s.data, history_size=s.history, test_size=s.test, seed=s.rng_seed)
    users = everyone[: s.users]
    if not users:
        raise ValueError(f"{s.data} gives no user with {s.history}+{s.test} items")
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "memory-batch.jsonl"
    save_records(users[0].history, records_path)
    seed = load_seed(s.seed_model, precision=s.precision)
    report = {"settings": asdict(s), "seed": seed.descriptor.seed_id, "hardware": describe(seed.device, seed.precision),
              "users": [u.user for u in users]}
    parts = {"memory": lambda: memory_part(s, records_path, seed),
             "throughput": lambda: throughput_part(s, seed, users[0].history),
             "quality": lambda: quality_part(s, seed, users, out),
             "precision": lambda: precision_part(s, everyone, users[0].history)}  # its own count of users
    for name in PARTS:
        report[name] = parts[name]() if name in s.parts else None
        (out / "report.json").write_text(json.dumps(report, indent=1, default=lambda o: None))  # so far
    report["plots"] = plots(report["quality"], out) if report["quality"] else []
    (out / "report.json").write_text(json.dumps(report, indent=1, default=lambda o: None))
    (out / "report.md").write_text(markdown(report))
    return report


def add_command(sub) -> None:
    """`bouquet trainers`, with a flag per setting."""
    from simulation.cli import add_settings_flags

    p = sub.add_parser("trainers", help="AdamW vs zeroth-order training and fp32 vs bf16: peak memory, speed and "
                                        "held-out quality on the same users")
    p.add_argument("--out", default="runs/trainers", help="run directory (default %(default)s)")
    add_settings_flags(p, TrainersBenchSettings, skip=("generate", "max_seed_distance", "assembly_batch_size",
                                                      "top_k", "temperature", "shortlist", "share_ratio",
                                                      "max_new_tokens", "trainer"))
    p.set_defaults(func=cmd_trainers)


def cmd_trainers(args) -> int:
    from simulation.cli import _local_model, settings_from

    s = settings_from(args, TrainersBenchSettings)
    _local_model(s.seed_model)
    report = run_trainers_bench(s, Path(args.out))
    print(markdown(report))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
