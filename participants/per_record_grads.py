"""Per-record gradients of linear weights from one batched backward pass (what DP-SGD clips).

For a linear layer y = x Wᵀ, record i's gradient of its own loss is  G_i = Σ_t δ_i,t ⊗ x_i,t  (δ the gradient
at the layer's output, x its input, t the record's tokens): the layer's input is kept on the forward pass, δ is
caught on the backward pass, and one einsum gives every record's gradient, where a backward pass per record gave
it before. Exact, not an approximation, as long as a record's loss depends on that record alone (padding is
masked; no batch statistics), which holds for a decoder with an attention mask.

It covers parameters that are the weight of an `nn.Linear` without a trained bias and held by no other module:
PEFT's LoRA factors. A tied weight (an LM head sharing the embedding), a bias or any other tensor has
gradients this does not see, so `covers` says no and DP-SGD takes its records one at a time.
"""

from __future__ import annotations

import torch


def linear_owners(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[torch.nn.Linear] | None:
    """The linear layer whose weight each parameter is, or None when any parameter is not only that."""
    holders: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, name))
    owners = []
    for p in params:
        held = holders.get(id(p), [])
        if len(held) != 1:
            return None
        module, name = held[0]
        if not isinstance(module, torch.nn.Linear) or name != "weight" or (
                module.bias is not None and module.bias.requires_grad):
            return None
        owners.append(module)
    return owners


class PerRecordGradients:
    """While active, records each owner layer's inputs and output gradients; `take()` after a backward pass of
    the sum of per-record losses gives every record's gradient, one (batch, *weight.shape) tensor per layer."""

    def __init__(self, owners: list[torch.nn.Linear]):
        self.owners = owners
        self._inputs: list[list[torch.Tensor]] = [[] for _ in owners]
        self._grads: list[dict[int, torch.Tensor]] = [{} for _ in owners]
        self._handles: list = []

    def __enter__(self) -> "PerRecordGradients":
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.owners)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        self._inputs = [[] for _ in self.owners]
        self._grads = [{} for _ in self.owners]

    def _hook(self, i: int):
        def hook(module, args, out):
            if not out.requires_grad:
                return
            if args[0].dim() != 3:
                raise ValueError(f"per-record gradients need (batch, tokens, features) inputs, got {tuple(args[0].shape)}")
            call = len(self._inputs[i])
            self._inputs[i].append(args[0].detach())

            def keep(grad, call=call):
                self._grads[i][call] = grad.detach()
            out.register_hook(keep)
        return hook

    def take(self) -> list[torch.Tensor]:
        """Each layer's per-record weight gradients, summed over the layer's calls in the forward pass."""
        out = []
        for i, module in enumerate(self.owners):
            if len(self._grads[i]) != len(self._inputs[i]):
                raise RuntimeError("per-record gradients: a layer's output gradient is missing (no backward pass?)")
            total = None
            for call, x in enumerate(self._inputs[i]):
                g = torch.einsum("bto,bti->boi", self._grads[i][call].float(), x.float())
                total = g if total is None else total + g
            if total is None:  # the layer was not used: its gradient is zero for every record
                raise RuntimeError("per-record gradients: a trained layer was not called in the forward pass")
            out.append(total)
        self.clear()
        return out
