"""The frozen base's linear layers with int8 weights, for a device where memory binds (precision int8).

Each linear layer of the decoder blocks keeps its weight as int8 with one fp32 scale per output channel
(symmetric, scale = max|w| / 127): a quarter of fp32's bytes. Weight-only: a forward pass dequantizes one layer's
weight at a time and multiplies in the input's precision, so activations are never quantized (fbgemm's dynamic
int8 kernels, which quantize the activations per tensor as well, run a forward pass 1.5x faster on this machine
kind but raised SmolLM2's held-out perplexity from 30.6 to 56.4 on health tweets). Backprop through a layer
(AdamW training a LoRA below it) flows to the input only; the base gets no gradient. The embeddings and the tied
output head stay as they are. `Int8Linear` is an `nn.Linear` to PEFT and to the hooks (same features, same module
names), so both trainers, assembly and evaluation run on it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def int8_supported(device: torch.device) -> str | None:
    """None when int8 weights run here, else why not (kept to the CPU, where memory is what binds)."""
    if device.type != "cpu":
        return f"int8 weights are for CPU devices, not {device.type}"
    return None


class Int8Linear(torch.nn.Linear):
    """A frozen linear layer with per-channel int8 weights (and the original bias, if any)."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.weight_dtype = linear.weight.dtype
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, made on access: one layer's, for the duration of its use."""
        return (self.qweight.float() * self.weight_scale[:, None]).to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def quantize_block_linears(model: torch.nn.Module) -> int:
    """Replace the decoder blocks' linear layers by Int8Linear, in place; returns how many."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and name.rsplit(".", 1)[-1] in BLOCK_LINEARS]
    for name, m in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8Linear(m))
    return len(targets)

