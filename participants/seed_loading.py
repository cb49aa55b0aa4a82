"""Loading a seed model on the device: CUDA in bf16 when present, CPU in fp32 otherwise."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from protocols.seeds import DEFAULT_SEED, SeedDescriptor, materialize


@dataclass
class LoadedSeed:
    descriptor: SeedDescriptor
    model: torch.nn.Module
    tokenizer: object
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


_cache: dict[tuple[str, str], LoadedSeed] = {}
_lock = threading.Lock()


def load_seed(source: str = DEFAULT_SEED, device: torch.device | None = None) -> LoadedSeed:
    """Materialize and load a seed once per process (a Ray actor keeps it across rounds).

    The model is frozen and in eval mode; callers attach adapters with hooks or PEFT and remove
    them again, so the cached copy stays the bare seed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or pick_device()
    key = (source, str(device))
    with _lock:
        if key not in _cache:
            desc = materialize(source)
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            tok = AutoTokenizer.from_pretrained(desc.path)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            model = AutoModelForCausalLM.from_pretrained(desc.path, dtype=dtype).to(device)
            if desc.delta is not None:  # a catalog seed: base + its LoRA delta, merged once here
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, desc.delta).merge_and_unload()
            model.eval()
            model.requires_grad_(False)
            _cache[key] = LoadedSeed(desc, model, tok, device)
        return _cache[key]


def is_loaded(source: str = DEFAULT_SEED, device: torch.device | None = None) -> bool:
    """Whether this process already holds the seed, so a caller knows not to forget what it did not load."""
    device = device or pick_device()
    with _lock:
        return (source, str(device)) in _cache


def forget_seed(source: str = DEFAULT_SEED, device: torch.device | None = None) -> bool:
    """Drop a seed from the process cache, so that trying a whole catalog never keeps it all in memory.

    The memory goes once no caller holds the LoadedSeed any more. True if the seed was cached.
    """
    device = device or pick_device()
    with _lock:
        return _cache.pop((source, str(device)), None) is not None
