"""Which trainer fits this device's memory: AdamW (backprop) or zeroth-order (forward passes only).

A device may state a memory budget for training in its limits.json (`memory-mib`: the most MiB of tensors a
training run may hold, the frozen base included). Before any training, the peak of each trainer is estimated for
the run's batch and length:

    inference     weights + the logits and their loss (B·L·V·(b + 8)) + one block's activations
    zeroth-order  inference + the adapter (fp32)
    adamw         weights + what autograd saves for backward (B·L·s) + the logits' gradient (B·L·V·4)
                  + the adapter, its gradient and AdamW's two moments (4 × its fp32 bytes)

where s, the bytes saved per token, is measured on this very model by one forward pass of a few tokens with a
LoRA attached (torch's saved-tensor hooks count them), so the estimate knows the architecture and the base's
precision without a table. `trainer auto` takes AdamW where it fits and zeroth-order where only it fits; a named
trainer that does not fit, or a budget nothing fits, is refused before any work, saying what would fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from participants.error_replies import Refusal
from participants.lora_hooks import LoraBranch, attached
from participants.lora_training import DEFAULT_TARGETS, LoraSettings
from participants.seed_loading import LoadedSeed
from protocols.settings import ParticipantSettings

MIB = 2**20
PROBE_TOKENS = 16


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak tensor bytes of each way to run at one batch × length."""
    weights: int
    inference: int
    zeroth_order: int
    adamw: int
    saved_per_token: int  # what autograd keeps per token for backward (measured)
    per_token_forward: int  # the logits, their loss and one block's activations, per token
    logits_grad_per_token: int  # the logits' gradient in fp32, per token

    def of(self, trainer: str) -> int:
        return self.adamw if trainer == "adamw" else self.zeroth_order


def adapter_numbers(model: torch.nn.Module, targets, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def saved_bytes_per_token(seed: LoadedSeed, targets, rank: int, dropout: float = 0.0) -> int:
    """Bytes autograd saves for backward per token, from one forward pass of PROBE_TOKENS tokens with a LoRA of
    `rank` on `targets` (distinct storages counted once); with LoRA dropout, PEFT also keeps each adapted layer's
    dropped-out input (fp32) and its mask."""
    named = [(n, m) for n, m in seed.model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    dev = seed.device
    branches = {n: LoraBranch(torch.zeros(rank, m.in_features, device=dev, requires_grad=True),
                              torch.zeros(m.out_features, rank, device=dev, requires_grad=True)) for n, m in named}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta" and not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, seed.model.config.vocab_size, (1, PROBE_TOKENS), device=dev)
    with attached(seed.model, branches), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = seed.model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits[0].float(), ids[0])
    frozen = {p.untyped_storage().data_ptr() for p in seed.model.parameters()}
    dropped = sum(m.in_features * (4 + 1) for _, m in named) if dropout > 0 else 0
    return sum(b for ptr, b in seen.items() if ptr not in frozen) // PROBE_TOKENS + dropped


def weight_bytes(model: torch.nn.Module) -> int:
    """The frozen base's bytes: its parameters and buffers (precision int8's weights and scales are buffers)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def estimate_memory(seed: LoadedSeed, targets, rank: int, batch_size: int, max_len: int,
                    dropout: float = LoraSettings.dropout) -> MemoryEstimate:
    cfg = seed.model.config
    weights = weight_bytes(seed.model)
    base_bytes = torch.finfo(seed.dtype).bits // 8
    tokens = batch_size * max_len
    # logits in the base's format, their fp32 copy and the loss's log-softmax (every position an answer token: the
    # worst batch, as answer_loss projects answer positions only); one block's largest activations
    per_token_forward = cfg.vocab_size * (base_bytes + 8) + 4 * (3 * cfg.intermediate_size + 4 * cfg.hidden_size)
    inference = weights + tokens * per_token_forward
    adapter = 4 * adapter_numbers(seed.model, targets, rank)
    saved = saved_bytes_per_token(seed, targets, rank, dropout)
    adamw = weights + tokens * (saved + 4 * cfg.vocab_size) + 4 * adapter
    return MemoryEstimate(weights, inference, inference + adapter, adamw, saved, per_token_forward, 4 * cfg.vocab_size)


def _largest_batch(est: MemoryEstimate, trainer: str, budget: int, batch_size: int, max_len: int) -> int:
    """The largest batch size (at this length) whose estimate fits the budget (0: none)."""
    fixed = est.of(trainer) - batch_size * max_len * _per_token(est, trainer)
    return max(0, int((budget - fixed) // (max_len * _per_token(est, trainer))))


def _per_token(est: MemoryEstimate, trainer: str) -> int:
    return est.per_token_forward if trainer == "zeroth-order" else est.saved_per_token + est.logits_grad_per_token


def choose_trainer(asked: str, budget_mib: int, est: MemoryEstimate, batch_size: int, max_len: int) -> tuple[str, str]:
    """(trainer, why) for `asked` in adamw, zeroth-order, auto under a budget (0: none); a Refusal naming what
    would fit when the asked trainer, or every trainer, is over the budget."""
    if budget_mib <= 0:
        return ("adamw" if asked == "auto" else asked), "no memory budget set"
    budget = budget_mib * MIB
    fits = {t: est.of(t) <= budget for t in ("adamw", "zeroth-order")}
    need = f"adamw ≈{est.adamw / MIB:.0f} MiB, zeroth-order ≈{est.zeroth_order / MIB:.0f} MiB at batch " \
           f"{batch_size} × {max_len} tokens; budget {budget_mib} MiB"
    if asked == "auto" and fits["adamw"]:
        return "adamw", f"auto: adamw fits ({need})"
    if asked == "auto" and fits["zeroth-order"]:
        return "zeroth-order", f"auto: only zeroth-order fits ({need})"
    if asked != "auto" and fits[asked]:
        return asked, f"{asked} fits ({need})"
    options = [f"trainer {t}" for t in ("adamw", "zeroth-order") if fits[t]]
    for t in ("adamw", "zeroth-order"):
        largest = _largest_batch(est, t, budget, batch_size, max_len)
        if largest >= 1:
            options.append(f"batch-size {largest} with trainer {t}")
    if not options:
        options.append(f"no batch size: the base's weights alone take {est.weights / MIB:.0f} MiB; a budget of at "
                       f"least {(est.zeroth_order - (batch_size - 1) * max_len * est.per_token_forward) / MIB:.0f}"
                       f" MiB trains one sequence with zeroth-order")
    raise Refusal(f"trainer {asked} does not fit this device's memory budget ({need}); would fit: "
                  f"{'; '.join(dict.fromkeys(options))}")


def fit_trainer(seed: LoadedSeed, s: ParticipantSettings, budget_mib: int) -> ParticipantSettings:
    """The settings with a concrete trainer that fits the budget, or a Refusal before any training."""
    if budget_mib <= 0 and s.trainer != "auto":
        return s
    est = estimate_memory(seed, DEFAULT_TARGETS, s.lora_rank, s.batch_size, s.max_len, dropout=s.lora_dropout)
    trainer, why = choose_trainer(s.trainer, budget_mib, est, s.batch_size, s.max_len)
    from participants.progress import log

    log.info("trainer %s: %s", trainer, why)
    return replace(s, trainer=trainer)
