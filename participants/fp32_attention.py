"""Attention in fp32 over a bf16 base on a CPU.

PyTorch's CPU flash-attention kernel is slower in bf16 than in fp32: forward and backward of one SmolLM2 layer's
attention, 4 × 128 tokens, one thread, take 42 ms in bf16 against 14 ms in fp32 (16 ms with the casts) on an
AVX-512 bf16 CPU, and on an AMX CPU that kernel was 14% of a bf16 LoRA step, twice fp32's time in it. So on a CPU
the bf16 base keeps its bf16 projections (where AMX pays) and runs the attention itself in fp32: q, k and v are
cast up and the output cast back, [batch, heads, length, 64] tensors, a small cost beside the kernel's.
"""

from __future__ import annotations

import torch

NAME = "bouquet_sdpa_fp32"


def sdpa_fp32(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, computed in fp32, returned in the query's dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def use_fp32_attention(model) -> bool:
    """Switch a bf16 model on a CPU from sdpa to sdpa in fp32 (sdpa's masks, the same results up to rounding).
    Models that run another attention keep it; returns whether the switch was made."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(NAME, sdpa_fp32)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
