"""The methods a target gets, each an adapter and what it paid for it, and the quality they are scored on.

    seed        the bare seed
    oppu        the target's own private LoRA, trained from scratch
    oppu-tuned  the same with its learning rate and steps chosen on a held-out quarter of the history
    retrieval   the whole adapter of the sharer whose profile is nearest the target's
    rag         the bare seed, each test input after the target's k nearest history items (retrieval in the prompt)
    random      random pieces of the pool, randomly weighted
    lorahub     one weight per sharer adapter of the pool, searched gradient-free on the history (LoraHub)
    perpcs      the newcomer pipeline a device runs (participants.newcomer): gates, shortlist, assembly
    perpcs+rag  the perpcs adapter with rag's prompts
    perpcs+ft   a short fine-tune from the perpcs adapter
    perpcs+zo   the same fine-tune by the zeroth-order trainer: a newcomer's device never runs a backward pass
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from participants.adapters import branches, load_peft_adapter, save_peft_adapter
from participants.assembly import random_assembly
from participants.cutting import choose_share
from participants.evaluation import generate, perplexity, rouge
from participants.history_prompt import history_prompts
from participants.lora_training import train_private_lora
from participants.newcomer import Newcomer, assemble_from_pool
from participants.profile import unit_profile
from participants.seed_loading import LoadedSeed
from participants.settings import assembly_settings, lora_settings
from protocols.pieces import Piece
from protocols.records import PersonalRecord
from protocols.settings import ParticipantSettings
from simulation.bench.gate_check import pieces_by_sharer
from simulation.bench.lorahub import lorahub
from simulation.bench.oppu_tuning import tune_private_lora
from simulation.bench.settings import BenchSettings
from simulation.bench.sharers import share_seed
from simulation.fidelity import FidelityJudge
from simulation.user_data import UserData, folder_name

Weights = dict[str, tuple[np.ndarray, np.ndarray]]
BASE = "base"  # the label of --seed-model in selections and rows


def ab_bytes(weights: Weights) -> int:
    """Bytes of an adapter's A and B as a saved PEFT folder holds them (float32)."""
    return sum(4 * (A.size + B.size) for A, B in weights.values())


@dataclass
class Outcome:
    """An adapter for one target and what the method paid for it (evaluation excluded)."""
    adapter: dict | None  # position -> LoraBranch; None for the bare seed
    seconds: float = 0.0
    tokens_forward: int = 0
    tokens_backward: int = 0
    bytes_stored: int = 0  # what the user keeps: the adapter, or references to pool pieces
    bytes_adapter: int = 0  # the A, B bytes of the adapter it runs with
    bytes_downloaded: int = 0
    detail: dict = field(default_factory=dict)
    prompts: list[str] | None = None  # each test record's user message, where the method writes its own (rag)

    def costs(self) -> dict:
        return {k: getattr(self, k) for k in ("seconds", "tokens_forward", "tokens_backward", "bytes_stored",
                                              "bytes_adapter", "bytes_downloaded")}


@dataclass
class Bench:
    seed: LoadedSeed
    s: BenchSettings
    out: Path
    sharers: list[str]  # in sharing order
    pool_pieces: list[Piece]  # everything the pool holds for the seed
    sharer_pieces: dict[str, list[Piece]]  # each sharer's full adapter
    sharer_profiles: dict[str, np.ndarray]
    label: str = BASE  # the seed's catalog name, or "base"

    def adapter_dir(self, target: str, method: str) -> Path:
        return self.out / "adapters" / folder_name(target) / method

    def shared(self, n_sharers: int, share_ratio: float) -> list[Piece]:
        """The pool the first n sharers would make when asked for this share ratio, each sending what its policy
        allows (the same draw as the real pool)."""
        sent = self.s.sent_share_ratio(share_ratio)
        pieces = [p for i, u in enumerate(self.sharers[:n_sharers])
                  for p in choose_share(self.sharer_pieces[u], sent, rng_seed=share_seed(self.s, i))]
        return sorted(pieces, key=lambda p: (p.position, p.piece_id))


def perpcs(seed: LoadedSeed, history: list[PersonalRecord], candidates: list[Piece], s: ParticipantSettings,
           adapter_dir: Path | None = None) -> tuple[Outcome, Newcomer]:
    """Per-Pcs as a newcomer's device runs it, the pool being `candidates`."""
    by_id = {p.piece_id: p for p in candidates}
    gates = [(p.piece_id, p.position, p.rank, p.gate) for p in candidates]
    done = assemble_from_pool(seed, history, gates, lambda ids: [by_id[i] for i in ids], s, adapter_dir)
    result = done.assembly
    return Outcome(branches(result.weights, 1.0, seed.device), done.seconds,
                   tokens_forward=done.shortlist_tokens + result.tokens,
                   bytes_stored=len(json.dumps(result.choices)), bytes_adapter=ab_bytes(result.weights),
                   bytes_downloaded=done.download_bytes,
                   detail={"shortlisted": len(done.shortlisted), "candidates": len(candidates)}), done


def _seed_method(b: Bench, target: UserData, index: int) -> Outcome:
    return Outcome(None)


def _oppu(b: Bench, target: UserData, index: int) -> Outcome:
    start = time.perf_counter()
    weights, report = train_private_lora(b.seed, target.history, lora_settings(b.s), desc=f"{target.user}: oppu")
    seconds = time.perf_counter() - start
    s = b.s
    save_peft_adapter(b.adapter_dir(target.user, "oppu"), weights, s.lora_rank, s.lora_alpha, b.seed.descriptor.seed_id)
    size = ab_bytes(weights)
    return Outcome(branches(weights, s.lora_alpha / s.lora_rank, b.seed.device), seconds, report.tokens,
                   report.tokens, size, size, 0, {"loss_first": report.losses[0], "loss_last": report.losses[-1]})


def _oppu_tuned(b: Bench, target: UserData, index: int) -> Outcome:
    """OPPU at its best: lr and steps chosen on a held-out quarter of the history; the cost is the final run's
    (the tuning runs are in the detail)."""
    start = time.perf_counter()
    tuned = tune_private_lora(b.seed, target.history, lora_settings(b.s), desc=f"{target.user}: oppu-tuned")
    seconds = time.perf_counter() - start
    s = b.s
    size = ab_bytes(tuned.weights)
    return Outcome(branches(tuned.weights, s.lora_alpha / s.lora_rank, b.seed.device), seconds, tuned.report.tokens,
                   tuned.report.tokens, size, size, 0,
                   {"lr": tuned.lr, "steps": tuned.steps, "tuning_tokens": tuned.tuning_tokens,
                    "curves": tuned.curves})


def _retrieval(b: Bench, target: UserData, index: int) -> Outcome:
    start = time.perf_counter()
    mine = unit_profile(target.history)
    similarity = {u: float(v @ mine) for u, v in b.sharer_profiles.items()}
    nearest = max(b.sharers, key=lambda u: similarity[u])
    pieces = b.sharer_pieces[nearest]
    weights = {p.position: (p.A, p.B) for p in pieces}
    adapter = branches(weights, pieces[0].scaling, b.seed.device)
    size = ab_bytes(weights)
    return Outcome(adapter, time.perf_counter() - start, bytes_stored=len(json.dumps([p.piece_id for p in pieces])),
                   bytes_adapter=size, bytes_downloaded=size,
                   detail={"sharer": nearest, "similarity": similarity[nearest]})


def _random(b: Bench, target: UserData, index: int) -> Outcome:
    start = time.perf_counter()
    result = random_assembly(b.pool_pieces, assembly_settings(b.s), rng_seed=b.s.rng_seed + index)
    seconds = time.perf_counter() - start
    by_id = {p.piece_id: p for p in b.pool_pieces}
    drawn = [by_id[pid] for pid, _ in (c for per_pos in result.choices[0].values() for c in per_pos)]
    # like Per-Pcs, the user keeps references to the drawn pieces and their weights
    return Outcome(branches(result.weights, 1.0, b.seed.device), seconds,
                   bytes_stored=len(json.dumps(result.choices)), bytes_adapter=ab_bytes(result.weights),
                   bytes_downloaded=sum(p.A.nbytes + p.B.nbytes for p in drawn))


def _lorahub(b: Bench, target: UserData, index: int) -> Outcome:
    """LoraHub over the sharers' shared adapters: every candidate weighting is a forward pass over the history."""
    adapters = pieces_by_sharer(b.pool_pieces, b.sharer_pieces)
    found = lorahub(b.seed, target.history, adapters, mix=b.s.mix, budget=b.s.lorahub_steps, max_len=b.s.max_len,
                    rng_seed=b.s.rng_seed + index, desc=f"{target.user}: lorahub")
    # the user keeps one weight per sharer and downloads every shared adapter
    return Outcome(branches(found.weights, 1.0, b.seed.device), found.seconds, tokens_forward=found.tokens,
                   bytes_stored=len(json.dumps(found.sharer_weights)), bytes_adapter=ab_bytes(found.weights),
                   bytes_downloaded=sum(p.A.nbytes + p.B.nbytes for ps in adapters.values() for p in ps),
                   detail={"sharer_weights": found.sharer_weights, "uniform_loss": found.uniform_loss,
                           "loss": found.loss, "evaluations": len(found.losses)})


def _rag_prompts(b: Bench, target: UserData) -> tuple[list[str], float, dict]:
    """Each test input after its k nearest history items (each cut to max-len tokens): the prompts, the seconds
    spent retrieving, and how many prompt tokens they add per test item (paid at every inference)."""
    start = time.perf_counter()
    prompts = history_prompts(target.history, target.test, b.s.rag_k, b.seed.tokenizer, b.s.max_len)
    seconds = time.perf_counter() - start
    tok = b.seed.tokenizer
    added = np.mean([len(tok(p)["input_ids"]) - len(tok(r.input)["input_ids"]) for p, r in zip(prompts, target.test)])
    return prompts, seconds, {"k": min(b.s.rag_k, len(target.history)), "prompt_tokens_added": float(added)}


def _rag(b: Bench, target: UserData, index: int) -> Outcome:
    prompts, seconds, detail = _rag_prompts(b, target)
    return Outcome(None, seconds, detail=detail, prompts=prompts)


def _perpcs(b: Bench, target: UserData, index: int) -> Outcome:
    folder = b.adapter_dir(target.user, "perpcs")
    outcome, _ = perpcs(b.seed, target.history, b.pool_pieces, b.s, folder)
    # what perpcs+ft and perpcs+rag add their own cost to
    meta = json.loads((folder / "bouquet.json").read_text()) | {"cost": outcome.costs()}
    (folder / "bouquet.json").write_text(json.dumps(meta, indent=1))
    return outcome


def _saved_perpcs(b: Bench, target: UserData, index: int) -> tuple[Weights, int, dict]:
    """The Per-Pcs adapter the perpcs method saved (made now when missing), its rank, and what it cost."""
    folder = b.adapter_dir(target.user, "perpcs")
    if not (folder / "bouquet.json").exists() or "cost" not in json.loads((folder / "bouquet.json").read_text()):
        _perpcs(b, target, index)
    weights, rank, _ = load_peft_adapter(folder)
    return weights, rank, json.loads((folder / "bouquet.json").read_text())["cost"]


def _perpcs_rag(b: Bench, target: UserData, index: int) -> Outcome:
    """The saved Per-Pcs adapter, answering rag's prompts; the cost is both of theirs."""
    weights, _, before = _saved_perpcs(b, target, index)
    prompts, seconds, detail = _rag_prompts(b, target)
    return Outcome(branches(weights, 1.0, b.seed.device), before["seconds"] + seconds, before["tokens_forward"],
                   0, before["bytes_stored"], before["bytes_adapter"], before["bytes_downloaded"], detail, prompts)


def _fine_tune(b: Bench, target: UserData, index: int, trainer: str, method: str) -> Outcome:
    """Fine-tune from the Per-Pcs adapter (saved by the perpcs method); its cost adds to Per-Pcs's."""
    weights, rank, before = _saved_perpcs(b, target, index)
    settings = lora_settings(b.s, rank=rank, alpha=float(rank), steps=b.s.ft_steps,  # scaling is in B
                             trainer=trainer)
    start = time.perf_counter()
    tuned, report = train_private_lora(b.seed, target.history, settings, init=weights, desc=f"{target.user}: {method}")
    seconds = time.perf_counter() - start
    save_peft_adapter(b.adapter_dir(target.user, method), tuned, rank, float(rank), b.seed.descriptor.seed_id)
    size = ab_bytes(tuned)
    backward = 0 if trainer == "zeroth-order" else report.tokens
    return Outcome(branches(tuned, 1.0, b.seed.device), before["seconds"] + seconds,
                   before["tokens_forward"] + report.tokens, backward, size, size, before["bytes_downloaded"],
                   {"loss_first": report.losses[0], "loss_last": report.losses[-1], "trainer": trainer,
                    "steps": len(report.losses), "stopped": getattr(report, "stopped", "")})


def _perpcs_ft(b: Bench, target: UserData, index: int) -> Outcome:
    return _fine_tune(b, target, index, "adamw", "perpcs+ft")


def _perpcs_zo(b: Bench, target: UserData, index: int) -> Outcome:
    """Forward passes only, assembly and fine-tune: zo-step-factor × ft-steps zeroth-order steps."""
    return _fine_tune(b, target, index, "zeroth-order", "perpcs+zo")


RUNNERS: dict[str, Callable[[Bench, UserData, int], Outcome]] = {
    "seed": _seed_method, "oppu": _oppu, "oppu-tuned": _oppu_tuned, "retrieval": _retrieval, "rag": _rag,
    "random": _random, "lorahub": _lorahub, "perpcs": _perpcs, "perpcs+rag": _perpcs_rag, "perpcs+ft": _perpcs_ft,
    "perpcs+zo": _perpcs_zo}


def quality(b: Bench, target: UserData, adapter: dict | None, judge: FidelityJudge,
            prompts: list[str] | None = None) -> dict:
    """Held-out perplexity, ROUGE of greedy generations, and style fidelity of those generations; `prompts` (rag):
    the user messages in place of the test inputs, the same answer tokens scored."""
    ppl = perplexity(b.seed, target.test, adapter, max_len=b.s.max_len, prompts=prompts)
    if not b.s.generate:  # --no-generate: perplexity only, the cheap bench
        return {"perplexity": ppl, "rouge1": math.nan, "rougeL": math.nan, "fidelity": math.nan, "generations": []}
    generations = generate(b.seed, target.test, adapter, max_new_tokens=b.s.max_new_tokens, prompts=prompts)
    return {"perplexity": ppl, **rouge(generations, [r.output for r in target.test]),
            "fidelity": judge.fidelity(target.user, generations), "generations": generations}
