"""Throughput of bouquet's hot loops against bare loops doing the same work, in one process.

    bouquet throughput [--seed-model S] [--steps N] [--batch-size B] [--max-len L]
                       [--repeats R] [--json PATH]

Parts, each in tokens per second (non-pad tokens through the model) of bouquet and of a bare loop:
  LoRA training   `train_private_lora` vs. PEFT + AdamW on the same batches (first step excluded)
  assembly        `assemble` over a 3-sharer pool vs. a no-grad forward of the bare seed
  gate shortlist  `shortlist` over the same pool's gates vs. the same forward
  DP-SGD          `train_private_lora` under DP-SGD, per-record gradients from batched backward passes,
                  vs. one backward pass per record (the same Poisson batches, clipping and noise)
The sides alternate A B A B … over the repeats; the median per side is reported, with the
process's peak memory after each part.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

from participants.assembly import AssemblySettings, assemble, shortlist
from participants.chat_data import IGNORE, batches, encode_all, endless_batches
from participants.dp_sgd import MICRO_BATCH, DpPlan
from participants.lora_training import LoraSettings, train_private_lora
from participants.precision import PRECISIONS, describe
from participants.seed_loading import LoadedSeed, load_seed
from protocols.pieces import Piece
from protocols.records import PersonalRecord
from protocols.seeds import DEFAULT_SEED, EMBEDDED_PREFIX, TINY

Batch = dict[str, torch.Tensor]

_ASKS = ("How do I {}?", "Any advice on how to {}?", "What is the easiest way to {}?",
         "I never managed to {}. What would you suggest?")
_TASKS = ("keep basil alive on a windowsill", "start running again after a long break",
          "make bread without a mixer", "stop losing my keys", "plan a cheap weekend trip",
          "learn to cook rice properly", "get better sleep before an early flight", "keep a small budget")
_SENTENCES = (
    "Start small and do it at the same time every day, so it becomes a habit rather than a decision.",
    "Most people give up because the first week feels slow, but that is exactly when it starts to work.",
    "Write down what you did each evening; a short note is enough and it shows you the progress.",
    "Keep the things you need in one place, near the door or the kitchen, where you will see them.",
    "If something goes wrong, change one thing at a time, otherwise you never learn what helped.",
    "Ask a friend to join you, because plans made with someone else are much harder to skip.",
    "Cheap tools are fine at the beginning; buy better ones only once you know what you really use.",
    "Give yourself a rest day now and then, since being tired makes every small task feel heavy.",
    "Read the instructions once before you begin, then follow them without rushing the slow parts.",
    "Set a timer for the boring steps, and stop when it rings even if you feel like going on.",
    "Water, light and patience matter more than any clever trick you will find on the internet.",
    "After a month, look back at your notes and keep only the habits that actually made a difference.",
)


def benchmark_records(n: int = 32) -> list[PersonalRecord]:
    """Chat records with plain-English answers of about 40 to 100 tokens, built in code."""
    records = []
    for i in range(n):
        ask, task = _ASKS[i // len(_TASKS) % len(_ASKS)], _TASKS[i % len(_TASKS)]
        answer = " ".join(_SENTENCES[(7 * i + 5 * j) % len(_SENTENCES)] for j in range(3 + i % 3))
        records.append(PersonalRecord(user="bench", input=ask.format(task), output=answer, id=str(i)))
    return records


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens(batch: Batch) -> int:
    return int(batch["attention_mask"].sum())


def bouquet_training(seed: LoadedSeed, records: list[PersonalRecord], settings: LoraSettings,
                     step_tokens: list[int]) -> float:
    """Tokens/s of train_private_lora over steps 2..N."""
    _, report = train_private_lora(seed, records, settings, desc="bouquet LoRA")
    if report.step_tokens != step_tokens:
        raise RuntimeError("train_private_lora saw other batches than the bare loop")
    return sum(step_tokens[1:]) / (report.step_ends[-1] - report.step_ends[0])


def bare_training(seed: LoadedSeed, data: list[Batch], settings: LoraSettings, step_tokens: list[int]) -> float:
    """Tokens/s over steps 2..N of a plain PEFT + AdamW loop, loss on the answer tokens."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(seed.model, config)
    try:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                weight_decay=0.0)
        model.train()
        start = 0.0
        for step, batch in enumerate(data):
            if step == 1:
                _sync(seed.device)
                start = time.perf_counter()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                   ignore_index=IGNORE)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(seed.device)
        return sum(step_tokens[1:]) / (time.perf_counter() - start)
    finally:
        model.eval()
        model.unload()  # the cached seed stays bare for the next run
        seed.model.requires_grad_(False)


def dp_training(seed: LoadedSeed, records: list[PersonalRecord], settings: LoraSettings, micro_batch: int,
                dp_batch: int) -> tuple[float, list[int]]:
    """Tokens/s over steps 2..N of train_private_lora under DP-SGD (expected batch `dp_batch`, a pinned generator:
    both sides draw the same records), its per-record gradients `micro_batch` records per backward pass."""
    generator = torch.Generator()
    generator.manual_seed(settings.seed)
    plan = DpPlan(noise_multiplier=1.0, sample_rate=min(1.0, dp_batch / len(records)), clip_norm=1.0,
                  steps=settings.steps, delta=1e-5, epsilon=float("nan"), generator=generator)
    _, report = train_private_lora(seed, records, replace(settings, dp_micro_batch=micro_batch),
                                   desc=f"DP-SGD, {micro_batch} a pass", dp=plan)
    return sum(report.step_tokens[1:]) / (report.step_ends[-1] - report.step_ends[0]), report.step_tokens


def random_pool(seed: LoadedSeed, settings: LoraSettings, sharers: int = 3) -> list[Piece]:
    """Signed pieces of the right shapes at every target module, random values, one key per sharer."""
    rng = np.random.default_rng(settings.seed)
    modules = [(name, m) for name, m in seed.model.named_modules()
               if name.rsplit(".", 1)[-1] in settings.targets and isinstance(m, torch.nn.Linear)]
    pool = []
    for _ in range(sharers):
        key = Ed25519PrivateKey.generate()
        for name, m in modules:
            d_in, d_out = m.in_features, m.out_features
            piece = Piece(seed_id=seed.descriptor.seed_id, seed_hash=seed.descriptor.content_hash, position=name,
                          rank=settings.rank, alpha=settings.alpha,
                          A=(rng.standard_normal((settings.rank, d_in)) / np.sqrt(d_in)).astype(np.float32),
                          B=(0.01 * rng.standard_normal((d_out, settings.rank))).astype(np.float32),
                          gate=rng.standard_normal(d_in).astype(np.float32))
            pool.append(piece.signed(key))
    return pool


def plain_forward(seed: LoadedSeed, hist: list[Batch], tokens: int) -> float:
    """Tokens/s of a no-grad forward pass of the bare seed over the history batches."""
    start = time.perf_counter()
    with torch.no_grad():
        for batch in hist:
            seed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    _sync(seed.device)
    return tokens / (time.perf_counter() - start)


def timed_assemble(seed: LoadedSeed, records: list[PersonalRecord], pool: list[Piece],
                   settings: AssemblySettings, tokens: int) -> float:
    """Tokens/s of a whole assemble(...) call (it ends by copying the adapter to the CPU)."""
    start = time.perf_counter()
    result = assemble(seed, records, pool, settings)
    seconds = time.perf_counter() - start
    if result.tokens != tokens:
        raise RuntimeError("assemble saw other history batches than the plain forward")
    return tokens / seconds


def timed_shortlist(seed: LoadedSeed, records: list[PersonalRecord], gates: list, settings: AssemblySettings,
                    tokens: int) -> float:
    """Tokens/s of a whole shortlist(...) call (it ends with the ids on the CPU)."""
    start = time.perf_counter()
    shortlist(seed, records, gates, settings)
    return tokens / (time.perf_counter() - start)


def _memory(device: torch.device) -> dict[str, float | None]:
    """The process's max RSS so far, and the CUDA peak since the last reset (None on CPU)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"max_rss_mib": rss, "cuda_peak_mib": cuda}


def _reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _part(bouquet: list[float], bare: list[float]) -> dict:
    b, r = statistics.median(bouquet), statistics.median(bare)
    return {"bouquet_tokens_per_s": b, "bare_tokens_per_s": r, "ratio": b / r,
            "bouquet_runs": bouquet, "bare_runs": bare}


def measure(seed: LoadedSeed, settings: LoraSettings, repeats: int, dp_steps: int = 4, dp_batch: int = 16) -> dict:
    """All parts on the same records; bouquet and bare sides alternate within each repeat."""
    records = benchmark_records()
    tok, dev = seed.tokenizer, seed.device
    memory = {"load": _memory(dev)}

    _reset_cuda_peak(dev)
    examples = encode_all(tok, records, settings.max_len)
    data = list(islice(endless_batches(examples, settings.batch_size, tok.pad_token_id, dev, settings.seed),
                       settings.steps))
    step_tokens = [_tokens(b) for b in data]
    bare_training(seed, data[:2], settings, step_tokens[:2])  # warm-up, not counted: neither side runs cold
    ours, bare = [], []
    for _ in range(repeats):
        ours.append(bouquet_training(seed, records, settings, step_tokens))
        bare.append(bare_training(seed, data, settings, step_tokens))
    training = _part(ours, bare)
    memory["training"] = _memory(dev)

    _reset_cuda_peak(dev)
    asm = AssemblySettings(batch_size=settings.batch_size, max_len=settings.max_len)
    hist = list(batches(examples, asm.batch_size, tok.pad_token_id, dev))
    hist_tokens = sum(_tokens(b) for b in hist)
    pool = random_pool(seed, settings)
    gates = [(p.piece_id, p.position, p.rank, p.gate) for p in pool]
    plain_forward(seed, hist[:1], _tokens(hist[0]))  # warm-up, not counted
    assembled, listed, forward = [], [], []
    for _ in range(repeats):
        assembled.append(timed_assemble(seed, records, pool, asm, hist_tokens))
        forward.append(plain_forward(seed, hist, hist_tokens))
        listed.append(timed_shortlist(seed, records, gates, asm, hist_tokens))
    memory["gate_scoring"] = _memory(dev)

    # DP-SGD's per-record gradients: batched against one record a pass; memory after each, the lean side first
    dp_settings = replace(settings, steps=dp_steps)
    one, batched, drawn = [], [], []
    for _ in range(repeats):
        speed, tokens = dp_training(seed, records, dp_settings, 1, dp_batch)
        one.append(speed)
        memory.setdefault("dp_one_record", _memory(dev))
        speed, again = dp_training(seed, records, dp_settings, MICRO_BATCH, dp_batch)
        batched.append(speed)
        memory.setdefault("dp_batched", _memory(dev))
        if tokens != again:
            raise RuntimeError("the two DP-SGD sides drew different records")

    return {"seed": seed.descriptor.seed_id, "seed_hash": seed.descriptor.content_hash, "device": dev.type,
            "hardware": describe(dev, seed.precision),
            "torch_threads": torch.get_num_threads(), "records": len(records), "history_batches": len(hist),
            "pool_pieces": len(pool),
            "settings": {"steps": settings.steps, "batch_size": settings.batch_size, "max_len": settings.max_len,
                         "repeats": repeats, "rank": settings.rank, "alpha": settings.alpha,
                         "targets": list(settings.targets)},
            "dp": {"steps": dp_steps, "expected_batch": dp_batch, "micro_batch": MICRO_BATCH},
            "parts": {"lora_training": training, "assembly": _part(assembled, forward),
                      "shortlist": _part(listed, forward), "dp_sgd": _part(batched, one)},
            "memory": memory}


def print_report(result: dict, console: Console) -> None:
    s = result["settings"]
    console.print(f"[bold]bouquet throughput[/]  seed {result['seed']} ({result['seed_hash'][:12]})  "
                  f"{result['hardware']}")
    console.print(f"steps {s['steps']} (first excluded), batch {s['batch_size']}, max-len {s['max_len']}, "
                  f"repeats {s['repeats']}, rank {s['rank']}; {result['records']} records, "
                  f"{result['history_batches']} history batches, pool of {result['pool_pieces']} pieces")
    table = Table(title="tokens/s, median over repeats",
                  caption="bare: a PEFT + AdamW loop (training), a no-grad forward of the bare seed (assemble, "
                          "shortlist), a backward pass per record (DP-SGD)")
    for col in ("part", "bouquet", "bare", "ratio", "bouquet runs", "bare runs"):
        table.add_column(col, justify="left" if col == "part" else "right")
    names = {"lora_training": "LoRA training", "assembly": "assemble", "shortlist": "shortlist",
             "dp_sgd": f"DP-SGD ({result['dp']['micro_batch']} records a pass)"}
    for key, part in result["parts"].items():
        runs = [" ".join(f"{v:.0f}" for v in part[side]) for side in ("bouquet_runs", "bare_runs")]
        table.add_row(names[key], f"{part['bouquet_tokens_per_s']:.0f}", f"{part['bare_tokens_per_s']:.0f}",
                      f"{part['ratio']:.2f}", *runs)
    console.print(table)
    mem = Table(title="peak memory after each part")
    for col in ("after", "max RSS MiB (process)", "CUDA peak MiB (part)"):
        mem.add_column(col, justify="left" if col == "after" else "right")
    for part, m in result["memory"].items():
        cuda = "–" if m["cuda_peak_mib"] is None else f"{m['cuda_peak_mib']:.0f}"
        mem.add_row(part, f"{m['max_rss_mib']:.0f}", cuda)
    console.print(mem)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bouquet throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed-model", default=DEFAULT_SEED, help=f"{DEFAULT_SEED}, {TINY}, a local HF folder or a hub id")
    p.add_argument("--steps", type=int, default=10, help="training steps per run (the first is warm-up)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="alternating bouquet/bare runs per part")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="the base's format (default auto: bf16 "
                                                                          "on a fast bf16 path, fp32 otherwise)")
    p.add_argument("--dp-steps", type=int, default=4, help="DP-SGD steps per run (the first is warm-up)")
    p.add_argument("--dp-batch", type=int, default=16, help="DP-SGD's expected batch (Poisson sampling)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.steps < 2 or args.dp_steps < 2 or args.repeats < 1 or args.dp_batch < 1:
        p.error("--steps and --dp-steps must be at least 2 (the first is not counted), --repeats and --dp-batch "
                "at least 1")
    if args.seed_model.startswith(EMBEDDED_PREFIX) or args.seed_model == TINY or Path(args.seed_model).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a hub
    try:
        seed = load_seed(args.seed_model, precision=args.precision)
    except ValueError as err:  # bf16 asked of hardware without it
        p.error(str(err))
    settings = LoraSettings(steps=args.steps, batch_size=args.batch_size, max_len=args.max_len)
    result = measure(seed, settings, args.repeats, dp_steps=args.dp_steps, dp_batch=args.dp_batch)
    print_report(result, Console())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
