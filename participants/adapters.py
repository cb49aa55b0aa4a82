"""Adapters as standard PEFT LoRA folders (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from participants.lora_hooks import LoraBranch

Weights = dict[str, tuple[np.ndarray, np.ndarray]]  # position -> (A, B)


def save_peft_adapter(folder: str | Path, weights: Weights, rank: int, alpha: float, base_model: str,
                      extra: dict | None = None) -> Path:
    """Write a folder that `PeftModel.from_pretrained(base, folder)` loads; atomic (temp dir renamed)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(weights), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    config.save_pretrained(str(tmp))
    tensors = {}
    for pos, (A, B) in weights.items():
        tensors[f"base_model.model.{pos}.lora_A.weight"] = torch.from_numpy(np.ascontiguousarray(A, np.float32))
        tensors[f"base_model.model.{pos}.lora_B.weight"] = torch.from_numpy(np.ascontiguousarray(B, np.float32))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    if extra:
        (tmp / "bouquet.json").write_text(json.dumps(extra, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def load_peft_adapter(folder: str | Path) -> tuple[Weights, int, float]:
    """Read back a folder written by save_peft_adapter (or any PEFT LoRA folder of one adapter)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    raw = load_file(str(folder / "adapter_model.safetensors"))
    weights: Weights = {}
    for key in raw:
        if key.endswith(".lora_A.weight"):
            pos = key[len("base_model.model."):-len(".lora_A.weight")]
            weights[pos] = (raw[key], raw[key.replace("lora_A", "lora_B")])
    return weights, int(cfg["r"]), float(cfg["lora_alpha"])


def branches(weights: Weights, scaling: float, device) -> dict[str, LoraBranch]:
    return {pos: LoraBranch(torch.from_numpy(np.asarray(A, np.float32)).to(device),
                            torch.from_numpy(np.asarray(B, np.float32)).to(device), scaling)
            for pos, (A, B) in weights.items()}
