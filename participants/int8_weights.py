"""The frozen base's linear layers with int8 weights, for a device where memory binds (precision int8).

Each linear layer of the decoder blocks keeps its weight as int8 with one fp32 scale per output channel
(symmetric, scale = max|w| / 127), packed for fbgemm's dynamic-quantization kernel: the input is quantized to
int8 per call and the product accumulates in int32 (AVX-512 VNNI where the CPU has it). Weights take a quarter of
fp32's bytes; the embeddings and the tied output head stay as they are. Backprop through a layer (AdamW training a
LoRA below it) dequantizes its weight for the input's gradient only, one layer at a time; the base gets no gradient.
`Int8Linear` is an `nn.Linear` to PEFT and to the hooks (same in/out features, same module names), so both trainers,
assembly and evaluation run on it unchanged. CPU only (fbgemm/x86 quantized engines).
"""

from __future__ import annotations

import warnings

import torch

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def int8_supported(device: torch.device) -> str | None:
    """None when int8 weights run here, else why not."""
    if device.type != "cpu":
        return f"int8 weights run on the CPU's fbgemm kernels, not on {device.type}"
    engines = set(torch.backends.quantized.supported_engines)
    if not engines & {"fbgemm", "x86"}:
        return f"this torch has no fbgemm/x86 quantized engine (it has {sorted(engines)})"
    return None


class _Int8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, dtype):
        ctx.packed, ctx.dtype = packed, dtype
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float().contiguous(), packed)
        return y.reshape(*shape[:-1], y.shape[-1]).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        weight = torch.ops.quantized.linear_unpack(ctx.packed)[0].dequantize()  # (out, in), this layer only
        return (grad.float() @ weight).to(grad.dtype), None, None


class Int8Linear(torch.nn.Linear):
    """A frozen linear layer with per-channel int8 weights (and the original bias, if any)."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        with warnings.catch_warnings():  # torch marks its quantized-tensor constructors deprecated, still the API
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0,
                                           torch.qint8)
            bias = None if linear.bias is None else linear.bias.detach().float()
            self._packed = torch.ops.quantized.linear_prepack(q, bias)
        self.weight_dtype = linear.weight.dtype
        self.register_parameter("bias", None)  # inside the packed weights

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, made on access (PEFT reads its device and dtype once when it wraps the layer);
        the forward pass never uses it."""
        return torch.ops.quantized.linear_unpack(self._packed)[0].dequantize().to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8Matmul.apply(x, self._packed, x.dtype)

    def int8_bytes(self) -> int:
        return self.in_features * self.out_features


def quantize_block_linears(model: torch.nn.Module) -> int:
    """Replace the decoder blocks' linear layers by Int8Linear, in place; returns how many."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and name.rsplit(".", 1)[-1] in BLOCK_LINEARS]
    for name, m in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8Linear(m))
    return len(targets)


def int8_weight_bytes(model: torch.nn.Module) -> int:
    return sum(m.int8_bytes() + 4 * m.out_features for m in model.modules() if isinstance(m, Int8Linear))
