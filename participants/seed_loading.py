"""Loading a seed model on the device, its frozen base in the precision the hardware runs fastest
(participants.precision: bf16 on CUDA or an AMX CPU, fp32 otherwise) unless a precision is asked for."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from participants.precision import DTYPES, resolve_precision
from protocols.seeds import DEFAULT_SEED, SeedDescriptor, materialize


@dataclass
class LoadedSeed:
    descriptor: SeedDescriptor
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    precision: str = "fp32"  # the frozen base's format: "fp32", "bf16" or "int8"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


_cache: dict[tuple[str, str, str], LoadedSeed] = {}
_lock = threading.Lock()


def _key(source: str, device: torch.device | None, precision: str) -> tuple[str, str, str]:
    device = device or pick_device()
    return source, str(device), resolve_precision(precision, device)


def load_seed(source: str = DEFAULT_SEED, device: torch.device | None = None, precision: str = "auto") -> LoadedSeed:
    """Materialize and load a seed once per process and precision (a Ray actor keeps it across rounds).

    The model is frozen and in eval mode; callers attach adapters with hooks or PEFT and remove
    them again, so the cached copy stays the bare seed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or pick_device()
    key = _key(source, device, precision)
    with _lock:
        if key not in _cache:
            desc = materialize(source)
            dtype = DTYPES[key[2]]
            tok = AutoTokenizer.from_pretrained(desc.path)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            model = AutoModelForCausalLM.from_pretrained(desc.path, dtype=dtype).to(device)
            if desc.delta is not None:  # a catalog seed: base + its LoRA delta, merged once here
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, desc.delta).merge_and_unload()
            if key[2] == "bf16" and device.type == "cpu":  # CPU attention is faster in fp32
                from participants.fp32_attention import use_fp32_attention

                use_fp32_attention(model)
            if key[2] == "int8":
                from participants.int8_weights import quantize_block_linears

                quantize_block_linears(model)
            model.eval()
            model.requires_grad_(False)
            _cache[key] = LoadedSeed(desc, model, tok, device, key[2])
        return _cache[key]


def is_loaded(source: str = DEFAULT_SEED, device: torch.device | None = None, precision: str = "auto") -> bool:
    """Whether this process already holds the seed, so a caller knows not to forget what it did not load."""
    with _lock:
        return _key(source, device, precision) in _cache


def forget_seed(source: str = DEFAULT_SEED, device: torch.device | None = None, precision: str = "auto") -> bool:
    """Drop a seed from the process cache, so that trying a whole catalog never keeps it all in memory.

    The memory goes once no caller holds the LoadedSeed any more. True if the seed was cached.
    """
    with _lock:
        return _cache.pop(_key(source, device, precision), None) is not None
