"""LoraHub (Huang et al., 2023), the rival of Per-Pcs among forward-only compositions: one weight per adapter of
the pool, searched without gradients on the newcomer's history.

Each sharer's shared pieces make one adapter. For weights w (one per sharer) the composed adapter is the pool's own
mix (participants.assembly.mixed_factors, `mix`): "dw" sum_s w_s B_s A_s, "ab" (sum_s w_s B_s)(sum_s w_s A_s), the
latter LoraHub's composition. A candidate w costs one forward pass over the history, scored as LoraHub scores it:
the mean answer-token loss plus 0.05 · mean |w|, with w in [-1.5, 1.5] and nevergrad's NGOpt choosing the next
candidate. LoraHub starts the search at w = 0, the bare seed; here it starts at the uniform 1/n, the pool's plain
mean, so that the search refines a composition rather than first finding one (a fairer rival on a budget of 40).
The loss is deterministic, so the answer is the best candidate evaluated (the start included), which is never
worse on the history than the uniform mean.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from participants.adapters import branches
from participants.assembly import common_rank, mixed_factors
from participants.chat_data import encode_all
from participants.evaluation import perplexity
from participants.progress import progress
from participants.seed_loading import LoadedSeed
from protocols.pieces import Piece
from protocols.records import PersonalRecord

L1 = 0.05  # LoraHub's regularisation: L1 · mean |w|
BOUND = 1.5  # LoraHub's box for each weight


@dataclass
class LoraHubResult:
    weights: dict[str, tuple[np.ndarray, np.ndarray]]  # position -> (A, B), scaling in B
    sharer_weights: dict[str, float]  # the chosen w, per sharer
    uniform_loss: float  # the objective at the start, w = 1/n
    loss: float  # the objective at the chosen w
    losses: list[float] = field(default_factory=list)  # every candidate's, in the order evaluated (start first)
    tokens: int = 0  # tokens through forward passes
    seconds: float = 0.0


class _Composer:
    """The sharers' pieces per position, ready to be mixed with any weights."""

    def __init__(self, adapters: dict[str, list[Piece]], mix: str):
        self.sharers, self.mix = list(adapters), mix
        rank = common_rank([p for ps in adapters.values() for p in ps])
        at: dict[str, list[tuple[int, Piece]]] = defaultdict(list)
        for i, u in enumerate(self.sharers):
            for p in adapters[u]:
                if p.rank == rank:
                    at[p.position].append((i, p))
        self.positions = {pos: (torch.tensor([i for i, _ in ps]),
                                torch.from_numpy(np.stack([p.A for _, p in ps])).float(),
                                torch.from_numpy(np.stack([p.B * p.scaling for _, p in ps])).float())
                          for pos, ps in at.items()}

    def __call__(self, w: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        wt = torch.from_numpy(np.asarray(w, np.float32))
        out = {}
        for pos, (who, A, B) in self.positions.items():
            A_m, B_m = mixed_factors(A, B, wt[who], self.mix)
            out[pos] = (A_m.numpy(), B_m.numpy())
        return out


def lorahub(seed: LoadedSeed, history: list[PersonalRecord], adapters: dict[str, list[Piece]], *, mix: str,
            budget: int, max_len: int, rng_seed: int = 0, desc: str = "lorahub") -> LoraHubResult:
    """The weights of `adapters` (sharer -> its shared pieces) that LoraHub's search finds on `history` within
    `budget` candidates after the uniform start, and the adapter they compose."""
    import nevergrad as ng

    if not adapters:
        raise ValueError("lorahub needs at least one sharer adapter in the pool")
    compose = _Composer(adapters, mix)
    n = len(compose.sharers)
    per_pass = sum(len(e.input_ids) for e in encode_all(seed.tokenizer, history, max_len))
    result = LoraHubResult({}, {}, math.nan, math.nan)

    def objective(w: np.ndarray) -> float:
        adapter = branches(compose(w), 1.0, seed.device)
        loss = math.log(perplexity(seed, history, adapter, max_len=max_len)) + L1 * float(np.mean(np.abs(w)))
        result.losses.append(loss)
        result.tokens += per_pass
        return loss

    start = time.perf_counter()
    uniform = np.full(n, 1.0 / n)
    parametrization = ng.p.Array(init=uniform, lower=-BOUND, upper=BOUND)
    parametrization.random_state = np.random.RandomState(rng_seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    best_w, best = uniform, objective(uniform)
    result.uniform_loss = best
    with progress(budget, desc) as bar:
        for _ in range(budget):
            candidate = optimizer.ask()
            loss = objective(candidate.value)
            optimizer.tell(candidate, loss)
            if loss < best:
                best_w, best = np.array(candidate.value), loss
            bar.update(best_loss=best)
    result.weights = compose(best_w)
    result.sharer_weights = dict(zip(compose.sharers, map(float, best_w)))
    result.loss, result.seconds = best, time.perf_counter() - start
    return result
