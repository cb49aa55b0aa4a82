"""LoRA branches attached to a frozen model with forward hooks.

    y = W x + scaling * B A (p(x) * x),   p(x) = sigmoid(g . x) when a gate g is given, else 1

The bare seed stays untouched (the process-wide cached model is shared), so pieces can be put
on and taken off without copying 135M parameters. PEFT is used where a standard adapter is the
point (private training, the saved folder); hooks where pieces come and go.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LoraBranch:
    A: torch.Tensor  # (rank, d_in)
    B: torch.Tensor  # (d_out, rank)
    scaling: float = 1.0
    gate: torch.Tensor | None = None  # (d_in,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # in the branch's own precision (fp32), whatever the base's: what is trained stays fp32 on a bf16 base
        h = x.to(self.A.dtype)
        if self.gate is not None:
            h = h * torch.sigmoid(h @ self.gate.to(h.dtype)).unsqueeze(-1)
        return (F.linear(F.linear(h, self.A), self.B.to(h.dtype)) * self.scaling).to(x.dtype)


def modules_at(model: torch.nn.Module, positions) -> dict[str, torch.nn.Module]:
    named = dict(model.named_modules())
    missing = [p for p in positions if p not in named]
    if missing:
        raise KeyError(f"the seed has no module at {missing[:3]}{'…' if len(missing) > 3 else ''}; "
                       f"pieces must come from the same seed architecture")
    return {p: named[p] for p in positions}


@contextmanager
def attached(model: torch.nn.Module, branches: dict[str, LoraBranch]):
    """Add the branches to the outputs of the named linear modules for the duration of the block."""
    handles = []
    try:
        for pos, module in modules_at(model, branches).items():
            branch = branches[pos]
            handles.append(module.register_forward_hook(lambda m, args, out, b=branch: out + b(args[0])))
        yield model
    finally:
        for h in handles:
            h.remove()
