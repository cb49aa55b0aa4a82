"""A newcomer assembles its adapter from the pool, in forward passes only (Per-Pcs).

For each position m, with x the module's input on the newcomer's own history:
    score_s = mean over examples of ( mean over answer-predicting tokens of LN(x)·LN(g_s)/sqrt(d) )
keep the top k pieces (k = dp-top-k where every candidate carries DP-SGD's ε: their noise is independent, so
more of them average it out), w = softmax(score / tau) (tau = dp-temperature there: noisy pieces and noisy gates
are better mixed evenly), and mix the updates (dw, the default) or A and B separately (ab, Per-Pcs's own):
    dW_m = sum_j w_j s_j B_j A_j            or    A_m = sum_j w_j A_j,   B_m = sum_j w_j s_j B_j
(s_j = alpha_j / rank_j folded into B). With mix-norm "pieces" a dw mix is rescaled to
sum_j w_j |s_j B_j A_j| (Frobenius): pieces whose directions differ no longer shorten the mix, and it is never
longer than its longest; not where any candidate is DP-trained.
The mix is applied inside the same forward pass, so positions later in the network are scored on
activations that already carry the earlier choices. Each history batch assembles anew; the
adapter is the uniform mean of the per-batch mixes.

Two phases keep the download small: `shortlist` scores every gate of the pool on the bare seed
and returns the ids of the best few per position; `assemble` runs the sequential procedure
above on just those pieces.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from participants.chat_data import batches, encode_all, predicts_answer_mask
from participants.lora_hooks import modules_at
from participants.progress import progress
from participants.seed_loading import LoadedSeed
from protocols.pieces import Piece
from protocols.records import PersonalRecord
from protocols.settings import ParticipantSettings


@dataclass
class AssemblySettings:
    """Defaults are the schema's (protocols.settings); participants.settings builds one from a run's settings."""
    top_k: int = ParticipantSettings.top_k
    dp_top_k: int = ParticipantSettings.dp_top_k  # where every candidate of a position is DP-trained
    temperature: float = ParticipantSettings.temperature
    dp_temperature: float = ParticipantSettings.dp_temperature  # where every candidate of a position is DP-trained
    shortlist: int = ParticipantSettings.shortlist  # pieces per position fetched after the gate phase (>= top_k)
    batch_size: int = ParticipantSettings.assembly_batch_size
    max_len: int = ParticipantSettings.max_len
    mix: str = ParticipantSettings.mix  # "ab": A and B averaged separately; "dw": the updates B A averaged
    scale: float = ParticipantSettings.mix_scale  # on the mixed update: a mean of pieces is shorter than each
    norm: str = ParticipantSettings.mix_norm  # "pieces": a dw mix as long as its pieces are, on average


@dataclass
class Assembly:
    weights: dict[str, tuple[np.ndarray, np.ndarray]]  # position -> (A, B) with scaling folded into B
    rank: int
    choices: list[dict[str, list[tuple[str, float]]]] = field(default_factory=list)  # per batch
    seconds: float = 0.0
    tokens: int = 0  # tokens through forward passes

    @property
    def alpha(self) -> float:
        return float(self.rank)  # scaling 1: it is already inside B


def example_scores(x: torch.Tensor, gates_ln: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's score of each candidate, the mean over its masked tokens of LN(x)·LN(g)/sqrt(d): (b, n);
    and which examples have a masked token at all (those whose answer was cut away entirely carry no signal)."""
    d = x.shape[-1]
    h = F.layer_norm(x.float(), (d,))
    s = torch.einsum("btd,nd->btn", h, gates_ln) / math.sqrt(d)
    m = mask.unsqueeze(-1).float()
    counts = m.sum(dim=1)  # (b, 1)
    return (s * m).sum(dim=1) / counts.clamp(min=1), counts.squeeze(-1) > 0


def _token_scores(x: torch.Tensor, gates_ln: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-candidate score: token mean over the mask per example, then mean over examples."""
    per_example, keep = example_scores(x, gates_ln, mask)
    return per_example[keep].mean(dim=0)


def _history_batches(seed: LoadedSeed, history: list[PersonalRecord], settings: AssemblySettings):
    examples = encode_all(seed.tokenizer, history, settings.max_len)
    return list(batches(examples, settings.batch_size, seed.tokenizer.pad_token_id, seed.device))


def gate_scores(seed: LoadedSeed, history: list[PersonalRecord], gates: list[tuple[str, str, int, np.ndarray]],
                settings: AssemblySettings) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Every gate's score on the bare seed, per position: (piece ids, summed scores over history batches)."""
    by_pos: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
    for pid, pos, _rank, g in gates:
        by_pos[pos].append((pid, g))
    gate_ln = {pos: F.layer_norm(torch.from_numpy(np.stack([g for _, g in c])).float().to(seed.device),
                                 (c[0][1].shape[0],)) for pos, c in by_pos.items()}
    totals = {pos: torch.zeros(len(c), device=seed.device) for pos, c in by_pos.items()}
    state: dict[str, torch.Tensor] = {}
    handles = []
    for pos, module in modules_at(seed.model, by_pos).items():
        def hook(m, args, out, pos=pos):
            totals[pos] += _token_scores(args[0], gate_ln[pos], state["mask"])
        handles.append(module.register_forward_hook(hook))
    hist = _history_batches(seed, history, settings)
    try:
        with torch.no_grad():
            for batch in hist:
                state["mask"] = predicts_answer_mask(batch["labels"])
                seed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return {pos: ([pid for pid, _ in cands], totals[pos]) for pos, cands in by_pos.items()}


def shortlist(seed: LoadedSeed, history: list[PersonalRecord], gates: list[tuple[str, str, int, np.ndarray]],
              settings: AssemblySettings) -> list[str]:
    """Phase 1: ids of the best `settings.shortlist` pieces per position, scored on the bare seed."""
    keep = []
    for ids, totals in gate_scores(seed, history, gates, settings).values():
        order = torch.argsort(totals, descending=True)[: settings.shortlist].tolist()
        keep.extend(ids[i] for i in order)
    return keep


def all_dp(pieces: list[Piece]) -> bool:
    """Whether every candidate of a position was trained by DP-SGD (its ε in the piece)."""
    return all(p.dp_epsilon is not None for p in pieces)


def asked_k(pieces: list[Piece], settings: AssemblySettings) -> int:
    """k asked at one position: dp-top-k where every candidate was trained by DP-SGD, top-k otherwise."""
    return settings.dp_top_k if all_dp(pieces) else settings.top_k


def mix_temperature(pieces: list[Piece], settings: AssemblySettings) -> float:
    """The softmax temperature at one position: dp-temperature where every candidate was trained by DP-SGD."""
    return settings.dp_temperature if all_dp(pieces) else settings.temperature


def pieces_to_mix(pieces: list[Piece], settings: AssemblySettings) -> int:
    """k mixed at one position: the k asked, at most every candidate."""
    return min(asked_k(pieces, settings), len(pieces))


class _Position:
    """The candidates at one position, ready for scoring and mixing on the device."""

    def __init__(self, pieces: list[Piece], device, k: int, temperature: float, rescale: bool):
        self.k = k
        self.temperature = temperature
        self.ids = [p.piece_id for p in pieces]
        d_in = pieces[0].A.shape[1]
        self.gates_ln = F.layer_norm(torch.from_numpy(np.stack([p.gate for p in pieces])).float().to(device), (d_in,))
        self.A = torch.from_numpy(np.stack([p.A for p in pieces])).float().to(device)  # (n, r, d_in)
        self.B = torch.from_numpy(np.stack([p.B * p.scaling for p in pieces])).float().to(device)  # (n, d_out, r)
        self.gram = update_gram(self.A, self.B) if rescale else None  # <B_i A_i, B_j A_j>, for mix-norm pieces


def assemble(seed: LoadedSeed, history: list[PersonalRecord], pieces: list[Piece],
             settings: AssemblySettings) -> Assembly:
    """Phase 2: sequential top-k assembly over the given pieces, averaged over history batches."""
    if not pieces:
        raise ValueError("no pieces to assemble from: the pool is empty for this seed")
    rank = common_rank(pieces)
    grouped: dict[str, list[Piece]] = defaultdict(list)
    for p in pieces:
        if p.rank == rank:
            grouped[p.position].append(p)
    positions = {pos: _Position(ps, seed.device, pieces_to_mix(ps, settings), mix_temperature(ps, settings),
                                rescales(ps, settings))
                 for pos, ps in grouped.items()}
    sums = {pos: [0.0, 0.0] for pos in positions}
    piece_weights = {pos: torch.zeros(len(c.ids), device=seed.device) for pos, c in positions.items()}
    most = max(asked_k(ps, settings) for ps in grouped.values())  # dw's rank: the widest mix asked
    result = Assembly(weights={}, rank=rank * most if settings.mix == "dw" else rank)
    state: dict = {}

    def make_hook(pos: str):
        cand = positions[pos]

        def hook(module, args, out):
            x = args[0]
            scores = _token_scores(x, cand.gates_ln, state["mask"])
            top_scores, top = torch.topk(scores, cand.k)
            w = torch.softmax(top_scores / cand.temperature, dim=0)
            state["choices"][pos] = [(cand.ids[i], float(wi)) for i, wi in zip(top.tolist(), w.tolist())]
            if cand.gram is not None:
                w = w * length_factor(cand.gram[top][:, top], w)
            if settings.mix == "dw":  # sum_j w_j B_j A_j x: each piece's own update, no cross terms B_i A_j
                piece_weights[pos][top] += w
                xa = torch.einsum("btd,nrd->btnr", x, cand.A[top].to(x.dtype))
                return out + torch.einsum("btnr,nor,n->bto", xa, cand.B[top].to(x.dtype),
                                          (settings.scale * w).to(x.dtype))
            A, B = mixed_factors(cand.A[top], cand.B[top], w, "ab")
            B = settings.scale * B
            sums[pos][0] = sums[pos][0] + A
            sums[pos][1] = sums[pos][1] + B
            return out + F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))
        return hook

    handles = [m.register_forward_hook(make_hook(pos)) for pos, m in modules_at(seed.model, positions).items()]
    hist = _history_batches(seed, history, settings)
    start = time.perf_counter()
    try:
        with torch.no_grad(), progress(len(hist), "assembling") as bar:
            for batch in hist:
                state["mask"] = predicts_answer_mask(batch["labels"])
                state["choices"] = {}
                seed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                result.choices.append(state["choices"])
                result.tokens += int(batch["attention_mask"].sum())
                bar.update()
    finally:
        for h in handles:
            h.remove()
    n = len(hist)
    if settings.mix == "dw":
        result.weights = {pos: _low_rank(positions[pos].A, positions[pos].B, settings.scale * piece_weights[pos] / n,
                                         result.rank)
                          for pos in positions}
    else:
        result.weights = {pos: ((a / n).cpu().numpy(), (b / n).cpu().numpy()) for pos, (a, b) in sums.items()}
    result.seconds = time.perf_counter() - start
    return result


def rescales(pieces: list[Piece], settings: AssemblySettings) -> bool:
    """Whether a position's dw mix is rescaled to its pieces' mean length: mix-norm pieces, except where any
    candidate is DP-trained (there the mean's shortness is partly independent noise cancelling, which a rescale
    would undo, and a noised piece's own length is partly noise)."""
    return settings.norm == "pieces" and settings.mix == "dw" and not any(p.dp_epsilon is not None for p in pieces)


def update_gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(n, n) Frobenius inner products <B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T)), without forming any
    d_out x d_in update."""
    btb = torch.einsum("ior,jos->ijrs", B.double(), B.double())
    aat = torch.einsum("ird,jsd->ijrs", A.double(), A.double())
    return (btb * aat).sum(dim=(-2, -1))


def length_factor(gram: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The factor that makes |sum_j w_j dW_j| equal sum_j w_j |dW_j| (1 where the mix is zero)."""
    wd = w.double()
    mixed = torch.sqrt(torch.clamp(wd @ gram @ wd, min=0.0))
    own = (wd * torch.sqrt(torch.clamp(torch.diagonal(gram), min=0.0))).sum()
    factor = own / mixed if float(mixed) > 0 else torch.ones((), dtype=torch.float64)
    return factor.to(w.dtype)


def mixed_factors(A: torch.Tensor, B: torch.Tensor, w: torch.Tensor, mix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A', B') of pieces (A_j, B_j), scaling in B, mixed with weights w (any sign), as `mix` says:
    "dw": B'A' = sum_j w_j B_j A_j exactly, A' the stacked A_j of the pieces with nonzero weight (rank m r);
    "ab": A' = sum_j w_j A_j, B' = sum_j w_j B_j (rank r, with the cross terms B_i A_j; LoraHub's composition)."""
    if mix == "ab":
        return torch.einsum("n,nrd->rd", w, A), torch.einsum("n,nor->or", w, B)
    used = torch.nonzero(w).flatten()
    if not len(used):  # all weights zero: a zero update of rank r
        used = torch.zeros(1, dtype=torch.long, device=w.device)
    return A[used].reshape(-1, A.shape[-1]), torch.cat([w[j] * B[j] for j in used.tolist()], dim=1)


def _low_rank(A: torch.Tensor, B: torch.Tensor, w: torch.Tensor, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """sum_j w_j B_j A_j as factors (A', B') of `rank`: exact when at most rank / r pieces carry weight, else
    its best rank-`rank` approximation (SVD). The factors share the singular values evenly."""
    A_cat, B_cat = mixed_factors(A, B, w, "dw")  # (m r, d_in), (d_out, m r)
    Qb, Rb = torch.linalg.qr(B_cat.double())
    Qa, Ra = torch.linalg.qr(A_cat.T.double())
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    keep = min(rank, len(S))
    root = S[:keep].sqrt()
    B_new = torch.zeros(B.shape[1], rank, dtype=torch.float64, device=A.device)
    A_new = torch.zeros(rank, A.shape[-1], dtype=torch.float64, device=A.device)
    B_new[:, :keep] = Qb @ U[:, :keep] * root
    A_new[:keep] = root[:, None] * (Vh[:keep] @ Qa.T)
    return A_new.float().cpu().numpy(), B_new.float().cpu().numpy()


def common_rank(pieces: list[Piece]) -> int:
    """A and B mix only at equal rank: use the rank most pieces have."""
    counts: dict[int, int] = defaultdict(int)
    for p in pieces:
        counts[p.rank] += 1
    return max(counts, key=lambda r: (counts[r], -r))


def random_assembly(pieces: list[Piece], settings: AssemblySettings, *, rng_seed: int) -> Assembly:
    """The random-pieces baseline: the same mixing with random scores instead of gate scores."""
    rng = np.random.default_rng(rng_seed)
    rank = common_rank(pieces)
    grouped: dict[str, list[Piece]] = defaultdict(list)
    for p in pieces:
        if p.rank == rank:
            grouped[p.position].append(p)
    weights, choices = {}, {}
    most = max((asked_k(ps, settings) for ps in grouped.values()), default=settings.top_k)
    for pos, ps in grouped.items():
        k = pieces_to_mix(ps, settings)
        idx = rng.choice(len(ps), size=k, replace=False)
        w = np.exp(rng.standard_normal(k) / mix_temperature(ps, settings)).astype(np.float32)
        w /= w.sum()
        choices[pos] = [(ps[i].piece_id, float(wi)) for i, wi in zip(idx, w)]
        if settings.mix == "dw":
            A = torch.from_numpy(np.stack([ps[i].A for i in idx]).astype(np.float32))
            B = torch.from_numpy(np.stack([ps[i].B * np.float32(ps[i].scaling) for i in idx]).astype(np.float32))
            tw = torch.from_numpy(w)
            if rescales(ps, settings):
                tw = tw * length_factor(update_gram(A, B), tw)
            weights[pos] = _low_rank(A, B, tw * np.float32(settings.scale), rank * most)
        else:
            weights[pos] = (sum(wi * ps[i].A.astype(np.float32) for wi, i in zip(w, idx)),
                            np.float32(settings.scale) * sum(wi * ps[i].B.astype(np.float32) * np.float32(ps[i].scaling)
                                                             for wi, i in zip(w, idx)))
    return Assembly(weights=weights, rank=rank * most if settings.mix == "dw" else rank, choices=[choices])
