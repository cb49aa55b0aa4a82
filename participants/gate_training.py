"""Gate training: one vector per piece, learned with the seed and the pieces frozen.

The LoRA branch sees p(x)·x with p(x) = sigmoid(g·x), so g learns on which inputs this piece
helps the sharer's own answers. Gates start at zero (p = 0.5) and are only used to score pieces
for newcomers; they are never applied at inference.
"""

from __future__ import annotations

import numpy as np
import torch

from participants.chat_data import encode_all, endless_batches
from participants.dp_sgd import DpPlan, run_dp_steps
from participants.lora_hooks import LoraBranch, attached
from participants.lora_training import LoraSettings, LoraWeights, TrainReport, run_steps
from participants.seed_loading import LoadedSeed
from protocols.records import PersonalRecord


def train_gates(seed: LoadedSeed, records: list[PersonalRecord], weights: LoraWeights, settings: LoraSettings,
                steps: int, lr: float, desc: str = "gates", dp: DpPlan | None = None,
                ) -> tuple[dict[str, np.ndarray], TrainReport]:
    """One gate per position; `dp` trains them by DP-SGD (participants.dp_sgd), as the LoRA was."""
    if settings.trainer == "zeroth-order":
        if dp is not None:
            raise ValueError("DP-SGD trains with gradients: the zeroth-order trainer has no private path")
        from participants.zeroth_order import train_gates_zeroth_order

        return train_gates_zeroth_order(seed, records, weights, settings, steps, desc)
    torch.manual_seed(settings.seed + 1)
    dev, scaling = seed.device, settings.alpha / settings.rank
    gates = {pos: torch.zeros(A.shape[1], device=dev, requires_grad=True) for pos, (A, _) in weights.items()}
    branches = {pos: LoraBranch(torch.from_numpy(A).to(dev), torch.from_numpy(B).to(dev), scaling, gates[pos])
                for pos, (A, B) in weights.items()}
    opt = torch.optim.AdamW(list(gates.values()), lr=lr, weight_decay=0.0)
    examples = encode_all(seed.tokenizer, records, settings.max_len)
    with attached(seed.model, branches):
        if dp is not None:
            report = run_dp_steps(seed.model, examples, seed.tokenizer.pad_token_id, dev, steps, opt,
                                  list(gates.values()), dp, desc)
        else:
            data = endless_batches(examples, settings.batch_size, seed.tokenizer.pad_token_id, dev, settings.seed + 1)
            report = run_steps(seed.model, data, steps, opt, list(gates.values()), desc)
    return {pos: g.detach().float().cpu().numpy() for pos, g in gates.items()}, report
