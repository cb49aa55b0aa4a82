"""How large a piece's numbers may be: bounds on A, B and alpha/rank each, shared by the pool and the newcomer.

Assembly mixes A and B separately (participants/assembly.py), so a bound on the update (alpha/r)·B·A alone lets a
piece through whose parts are huge: alpha = 1e300 with B = 0, or A×1e6 with B/1e6, each has a small update but
poisons any mix it enters. Bounding ||A||, ||B|| and alpha/r each bounds every mix: a softmax mix of A's is a
convex combination, so ||A_mix|| <= max ||A||, likewise for B, and the mixed update is at most
max_scaling · max_a_norm · max_b_norm. The newcomer checks the mixed result once more before saving it.
Norms are computed in float32, as the device computes the mix: a value that overflows there is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protocols.settings import setting


@dataclass(frozen=True)
class PieceBounds:
    max_a_norm: float = setting(256.0, "largest Frobenius norm of a piece's A", low=0, low_open=True)
    max_b_norm: float = setting(256.0, "largest Frobenius norm of a piece's B", low=0, low_open=True)
    max_scaling: float = setting(64.0, "largest alpha / rank of a piece", low=0, low_open=True)
    max_delta_norm: float = setting(100.0, "largest Frobenius norm of a piece's update (alpha/rank)·B·A, and of "
                                           "an assembled position's B·A", low=0, low_open=True)
    max_gate_norm: float = setting(1e4, "largest norm of a piece's gate", low=0, low_open=True)
    max_rank: int = setting(256, "largest LoRA rank of a piece", low=1)


def norm32(arr: np.ndarray) -> float:
    """Frobenius norm in float32 (inf when it overflows there); NaN in, NaN out."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.linalg.norm(np.asarray(arr, dtype=np.float32).ravel()))


def nonfinite_problem(tensors: dict[str, np.ndarray]) -> str | None:
    for name, arr in tensors.items():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        if bad:
            return f"{name} holds {bad} NaN/inf values"
    return None


def update_norm(A: np.ndarray, B: np.ndarray, scaling: float = 1.0) -> float:
    """||scaling · B A||_F in float32, through the r x r Grams (without forming B A)."""
    A32, B32 = np.asarray(A, np.float32), np.asarray(B, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.float32(np.trace((A32 @ A32.T) @ (B32.T @ B32)))
        return float(np.float32(abs(scaling)) * np.sqrt(max(sq, np.float32(0))))


def size_problem(A: np.ndarray, B: np.ndarray, alpha: float, rank: int, gate: np.ndarray | None,
                 bounds: PieceBounds) -> str | None:
    """The first bound a piece's numbers break, in words, or None. Assumes finite values and matching shapes."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        return f"alpha {alpha!r} is not a finite positive number"
    with np.errstate(over="ignore", invalid="ignore"):
        scaling = float(np.float32(alpha) / np.float32(rank))
    if not scaling <= bounds.max_scaling:
        return f"alpha/rank = {scaling:.4g} is above {bounds.max_scaling:g}"
    for name, arr, bound in (("A", A, bounds.max_a_norm), ("B", B, bounds.max_b_norm)):
        size = norm32(arr)
        if not size <= bound:
            return f"{name} has Frobenius norm {size:.4g}, above {bound:g}"
    delta = update_norm(A, B, scaling)
    if not delta <= bounds.max_delta_norm:
        return f"the update (alpha/rank) B A has Frobenius norm {delta:.4g}, above {bounds.max_delta_norm:g}"
    if gate is not None and not norm32(gate) <= bounds.max_gate_norm:
        return f"the gate has norm {norm32(gate):.4g}, above {bounds.max_gate_norm:g}"
    return None


def mixed_problem(weights: dict[str, tuple[np.ndarray, np.ndarray]], bounds: PieceBounds) -> str | None:
    """Why an assembled adapter (position -> (A, B) with the scaling folded into B) must not be saved, or None."""
    for pos, (A, B) in weights.items():
        reason = nonfinite_problem({"A": A, "B": B})
        if reason is None and not norm32(A) <= bounds.max_a_norm:
            reason = f"A has Frobenius norm {norm32(A):.4g}, above {bounds.max_a_norm:g}"
        b_bound = bounds.max_scaling * bounds.max_b_norm
        if reason is None and not norm32(B) <= b_bound:
            reason = f"B (scaling folded in) has Frobenius norm {norm32(B):.4g}, above {b_bound:g}"
        if reason is None and not update_norm(A, B) <= bounds.max_delta_norm:
            reason = f"the update B A has Frobenius norm {update_norm(A, B):.4g}, above {bounds.max_delta_norm:g}"
        if reason is not None:
            return f"position {pos}: {reason}"
    return None
