"""One way to run, in a process of its own, for its peak memory: `python -m simulation.trainer_memory MODE ...`.

MODE is inference (a no-grad forward pass and its loss, as evaluation runs it), adamw (LoRA steps by backprop) or
zeroth-order (LoRA steps by SPSA). The process's peak RSS is per process, so each mode gets its own. Printed as one
JSON line: the peak RSS over the whole process (ru_maxrss), the peak RSS sampled every 2 ms during the steps only
(loading the model peaks on its own), the RSS before the steps, and the bytes of live tensors at the step's
peak as counted (weights, adapter, gradients, optimizer state, and what autograd saved for backward).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class RssSampler:
    """The largest RSS seen while the block runs, sampled from a thread."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_now())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = rss_now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_now())


def measure(mode: str, seed_model: str, precision: str, records_path: str, batch_size: int, max_len: int,
            rank: int, steps: int) -> dict:
    from participants.chat_data import collate, encode_all, next_token_loss
    from participants.lora_training import LoraSettings, train_private_lora
    from participants.seed_loading import load_seed
    from participants.trainer_choice import weight_bytes
    from protocols.records import load_records

    seed = load_seed(seed_model, precision=precision)
    records = load_records(records_path)
    lengths = [len(e.input_ids) for e in encode_all(seed.tokenizer, records, max_len)]
    chosen = [records[i] for i in sorted(range(len(records)), key=lambda i: -lengths[i])[:batch_size]]  # the worst
    examples = encode_all(seed.tokenizer, chosen, max_len)
    batch = collate(examples, seed.tokenizer.pad_token_id, seed.device)
    weights = weight_bytes(seed.model)
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    # forward passes without backward hold the logits and their fp32 copy at their peak (what backprop keeps of
    # them, autograd's saved tensors count)
    logits_bytes = batch["input_ids"].numel() * seed.model.config.vocab_size * (torch.finfo(seed.dtype).bits // 8 + 4)
    before = rss_now()
    live = weights
    with RssSampler() as sampler:
        if mode == "inference":
            for _ in range(steps):
                with torch.no_grad():
                    logits = seed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    next_token_loss(logits, batch["labels"])
                del logits
            live += logits_bytes
        else:
            trainer = "adamw" if mode == "adamw" else "zeroth-order"
            settings = LoraSettings(rank=rank, alpha=2.0 * rank, steps=steps, batch_size=len(examples),
                                    max_len=max_len, trainer=trainer)
            settings = replace(settings, zeroth_order=replace(settings.zeroth_order, step_factor=1))
            frozen = {p.untyped_storage().data_ptr() for p in seed.model.parameters()}
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                weights_out, _ = train_private_lora(seed, chosen, settings)
            adapter = sum(4 * (A.size + B.size) for A, B in weights_out.values())
            # adamw: the adapter, its gradient, AdamW's two moments; zeroth-order: the adapter alone
            live += 4 * adapter if mode == "adamw" else adapter + logits_bytes
            live += sum(b for ptr, b in saved.items() if ptr not in frozen)
    return {"mode": mode, "precision": seed.precision, "tokens": int(batch["attention_mask"].sum()),
            "batch": list(batch["input_ids"].shape), "rss_before_mib": before / 2**20,
            "rss_peak_steps_mib": sampler.peak / 2**20,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "weights_mib": weights / 2**20, "live_tensors_mib": live / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulation.trainer_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("inference", "adamw", "zeroth-order"))
    p.add_argument("--seed-model", required=True)
    p.add_argument("--precision", default="auto")
    p.add_argument("--records", required=True, help="a personal-data JSONL file; its longest items make the batch")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--max-len", type=int, required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    if not Path(args.records).is_file():
        p.error(f"--records {args.records}: no such file")
    print(json.dumps(measure(args.mode, args.seed_model, args.precision, args.records, args.batch_size,
                             args.max_len, args.rank, args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
